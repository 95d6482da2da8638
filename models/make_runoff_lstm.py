"""Train an LSTM rainfall–runoff model on a synthetic monthly series; export ``runoff_lstm.onnx``.

The series: 800 years of monthly weather, 9 variables (``runoff_variables.json`` lists them in input order):

    0 precipitation        mm/month   gamma-distributed, wetter in winter                     DRIVER
    1 temperature          °C         seasonal cycle + noise                                  DRIVER
    2 evapotranspiration   mm/month   seasonal cycle + noise (summer peak)                    DRIVER
    3 relative_humidity    %          pure noise
    4 wind_speed           m/s        pure noise
    5 solar_radiation      W/m²       pure noise
    6 air_pressure         hPa        pure noise
    7 cloud_cover          %          pure noise
    8 sunshine_hours       h/month    pure noise

Runoff in month t (mm/month) is, with P precipitation, T temperature, E evapotranspiration:

    runoff_t = max(0, 0.50 P_t + 0.30 P_{t-1} + 0.15 P_{t-2}                 rain, lags 0-2
                      + 0.5 melt(T_{t-1}) + 0.3 melt(T_{t-2}) + 0.2 melt(T_{t-3})   snowmelt, lags 1-3
                      - 0.40 E_t                                                evapotranspiration, lag 0
                      + noise),   melt(T) = 40 exp(-((T - 5) / 3)^2),   noise ~ N(0, 3²)

so the snowmelt term peaks when the temperature one to three months earlier was near 5 °C (spring thaw) and
vanishes in cold or hot months. Nothing else matters: the other six variables, precipitation beyond lag 2,
temperature at lag 0 and beyond lag 3, and evapotranspiration beyond lag 0 carry no signal.

Windows: 12 consecutive months, oldest first, so time index 11 is month t (lag 0), index 10 is lag 1, ...,
index 0 is lag 11. The first 70% of the windows (in time) train the model, the rest test it.

Model: standardise each variable (fixed mean/std from the training windows, inside the model) →
LSTM(9→32) → last step's hidden state → Linear(32→1) → back to mm/month. Input ``input``: float32
(batch, 12, 9) in the physical units above. Output ``runoff``: float32 (batch, 1) in mm/month.

Writes next to this script:
    runoff_lstm.onnx         the exported model (checked against PyTorch by ``converters.export_torch``)
    runoff_data.npy          240 held-out windows, float32 (240, 12, 9), physical units
    runoff_variables.json    the 9 variable names, in input order

Deterministic (seeded, single-threaded); runs in well under a minute on a CPU.
Run: ``python models/make_runoff_lstm.py``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from onnxshap.converters import export_torch

HERE = Path(__file__).resolve().parent

SEED = 0
YEARS = 800
WINDOW = 12
EPOCHS = 30
BATCH = 32

VARIABLES = [
    "precipitation", "temperature", "evapotranspiration", "relative_humidity", "wind_speed",
    "solar_radiation", "air_pressure", "cloud_cover", "sunshine_hours",
]
# (mean, std) of the six pure-noise variables, in the order of VARIABLES[3:].
NOISE = [(70.0, 10.0), (4.0, 1.5), (180.0, 40.0), (1013.0, 8.0), (60.0, 15.0), (150.0, 40.0)]


def melt(temperature: np.ndarray) -> np.ndarray:
    """Snowmelt (mm/month) as a function of one month's temperature: peaks at 5 °C."""
    return 40.0 * np.exp(-(((temperature - 5.0) / 3.0) ** 2))


def weather(months: int, rng: np.random.Generator) -> np.ndarray:
    """A monthly weather series, float64 (months, 9), in the units of the module docstring."""
    season = 2 * np.pi * np.arange(months) / 12.0
    precip_mean = 80.0 + 30.0 * np.cos(season)  # wettest in January
    precipitation = rng.gamma(4.0, precip_mean / 4.0)
    temperature = 8.0 - 12.0 * np.cos(season) + rng.normal(0.0, 2.5, months)  # coldest in January
    evapotranspiration = np.clip(45.0 - 35.0 * np.cos(season) + rng.normal(0.0, 8.0, months), 0.0, None)
    noise = [rng.normal(mean, std, months) for mean, std in NOISE]
    return np.stack([precipitation, temperature, evapotranspiration, *noise], axis=1)


def runoff(w: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Runoff (mm/month) for months 3.. of the series (the formula needs three months of history)."""
    p, t, e = w[:, 0], w[:, 1], w[:, 2]
    now = np.arange(3, len(w))
    rain = 0.50 * p[now] + 0.30 * p[now - 1] + 0.15 * p[now - 2]
    snow = 0.5 * melt(t[now - 1]) + 0.3 * melt(t[now - 2]) + 0.2 * melt(t[now - 3])
    return np.maximum(0.0, rain + snow - 0.40 * e[now] + rng.normal(0.0, 3.0, len(now)))


def make_windows(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Windows float32 (n, 12, 9), oldest month first, and the last month's runoff, float32 (n, 1)."""
    w = weather(12 * YEARS, rng)
    y = np.concatenate([np.full(3, np.nan), runoff(w, rng)])
    ends = np.arange(WINDOW - 1, len(w))
    x = np.stack([w[end - WINDOW + 1:end + 1] for end in ends])
    return x.astype(np.float32), y[ends, None].astype(np.float32)


class RunoffLSTM(torch.nn.Module):
    """Standardise → LSTM(32) → Linear(1) on the last step → de-standardise to mm/month."""

    def __init__(self, x_mean: np.ndarray, x_std: np.ndarray, y_mean: float, y_std: float) -> None:
        super().__init__()
        self.register_buffer("x_mean", torch.tensor(x_mean, dtype=torch.float32))
        self.register_buffer("x_std", torch.tensor(x_std, dtype=torch.float32))
        self.register_buffer("y_mean", torch.tensor(y_mean, dtype=torch.float32))
        self.register_buffer("y_std", torch.tensor(y_std, dtype=torch.float32))
        self.lstm = torch.nn.LSTM(len(VARIABLES), 32, batch_first=True)
        self.head = torch.nn.Linear(32, 1)

    def standardised(self, x: torch.Tensor) -> torch.Tensor:
        """The prediction in units of the training target's standard deviation."""
        h, _ = self.lstm((x - self.x_mean) / self.x_std)
        return self.head(h[:, -1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.standardised(x) * self.y_std + self.y_mean


def train(x: np.ndarray, y: np.ndarray) -> RunoffLSTM:
    """Adam on mean squared error of the standardised target, fixed-seed mini-batches."""
    torch.manual_seed(SEED)
    y_mean, y_std = float(y.mean()), float(y.std())
    model = RunoffLSTM(x.reshape(-1, x.shape[-1]).mean(0), x.reshape(-1, x.shape[-1]).std(0), y_mean, y_std)
    optimizer = torch.optim.Adam(model.parameters(), lr=5e-3)
    xt, yt = torch.from_numpy(x), torch.from_numpy((y - y_mean) / y_std)
    generator = torch.Generator().manual_seed(SEED)
    for _ in range(EPOCHS):
        for idx in torch.randperm(len(xt), generator=generator).split(BATCH):
            optimizer.zero_grad()
            torch.nn.functional.mse_loss(model.standardised(xt[idx]), yt[idx]).backward()
            optimizer.step()
    return model.eval()


def scores(model: RunoffLSTM, x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """(R², RMSE in mm/month) of the model on windows x with targets y."""
    with torch.no_grad():
        pred = model(torch.from_numpy(x)).numpy()
    residual = ((pred - y) ** 2).mean()
    return float(1.0 - residual / y.var()), float(np.sqrt(residual))


def main() -> None:
    torch.set_num_threads(1)
    x, y = make_windows(np.random.default_rng(SEED))
    split = int(0.7 * len(x))
    x_train, y_train, x_test, y_test = x[:split], y[:split], x[split:], y[split:]
    model = train(x_train, y_train)
    for name, xs, ys in (("train", x_train, y_train), ("test", x_test, y_test)):
        r2, rmse = scores(model, xs, ys)
        print(f"{name:5s} R² {r2:.4f}  RMSE {rmse:.2f} mm/month  ({len(ys)} windows, target std {ys.std():.1f})")

    data = x_test[:240]
    export_torch(model, data, HERE / "runoff_lstm.onnx", output_names=["runoff"])
    np.save(HERE / "runoff_data.npy", data)
    (HERE / "runoff_variables.json").write_text(json.dumps(VARIABLES, indent=2) + "\n")
    for name in ("runoff_lstm.onnx", "runoff_data.npy", "runoff_variables.json"):
        print(f"wrote {name} ({(HERE / name).stat().st_size / 1024:.1f} KB)")


if __name__ == "__main__":
    main()
