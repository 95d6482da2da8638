"""Train a three-layer stacked LSTM on a synthetic product-threshold task; export ``stacked_lstm.onnx``.

Data: sequences of 10 time steps × 3 variables, every value uniform in [0, 1]. The target is the
final step's ``y = [x1 · x2 < 0.25]`` (x1, x2, x3 are the variables; the probability of y = 1 is about
0.60). Only x1 and x2 at the last time step (index 9) matter; x3 is pure noise, and so are all earlier steps.
A correct explanation puts (nearly) all attribution on x1 and x2 at step 9.

Model: LSTM(3→10) → LSTM(10→5) → LSTM(5→1) over the sequence, the last step's hidden value of the third
LSTM → Linear(1→1) → Sigmoid. Input ``input``: float32 (batch, 10, 3). Output ``probability``: float32
(batch, 1), the predicted P(y = 1). The ONNX graph has three ``LSTM`` nodes (TorchScript exporter).

Writes next to this script:
    stacked_lstm.onnx         the exported model (checked against PyTorch by ``converters.export_torch``)
    stacked_lstm_data.npy     200 held-out sequences, float32 (200, 10, 3), to explain or use as background

Deterministic (seeded, single-threaded); runs in about half a minute on a CPU.
Run: ``python models/make_stacked_lstm.py``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from onnxshap.converters import export_torch

HERE = Path(__file__).resolve().parent

SEED = 0
STEPS, VARIABLES = 10, 3
N_TRAIN, N_TEST = 4000, 1000
EPOCHS = 50
BATCH = 100


class StackedLSTM(torch.nn.Module):
    """LSTM(10) → LSTM(5) → LSTM(1); the last step's hidden value → Linear → Sigmoid."""

    def __init__(self) -> None:
        super().__init__()
        self.lstm1 = torch.nn.LSTM(VARIABLES, 10, batch_first=True)
        self.lstm2 = torch.nn.LSTM(10, 5, batch_first=True)
        self.lstm3 = torch.nn.LSTM(5, 1, batch_first=True)
        self.head = torch.nn.Linear(1, 1)

    def logit(self, x: torch.Tensor) -> torch.Tensor:
        h, _ = self.lstm1(x)
        h, _ = self.lstm2(h)
        h, _ = self.lstm3(h)
        return self.head(h[:, -1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.logit(x))


def make_data(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """x uniform in [0, 1]^(n, 10, 3); y = [x1 · x2 < 0.25] at the last step, float32 (n, 1)."""
    x = rng.random((n, STEPS, VARIABLES), dtype=np.float32)
    y = (x[:, -1, 0] * x[:, -1, 1] < 0.25).astype(np.float32)[:, None]
    return x, y


def train(x: np.ndarray, y: np.ndarray) -> StackedLSTM:
    """Adam on binary cross-entropy of the logit, fixed-seed mini-batches."""
    torch.manual_seed(SEED)
    model = StackedLSTM()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    generator = torch.Generator().manual_seed(SEED)
    for _ in range(EPOCHS):
        for idx in torch.randperm(len(xt), generator=generator).split(BATCH):
            optimizer.zero_grad()
            torch.nn.functional.binary_cross_entropy_with_logits(model.logit(xt[idx]), yt[idx]).backward()
            optimizer.step()
    return model.eval()


def accuracy(model: StackedLSTM, x: np.ndarray, y: np.ndarray) -> float:
    with torch.no_grad():
        return float(((model(torch.from_numpy(x)) > 0.5).float().numpy() == y).mean())


def main() -> None:
    torch.set_num_threads(1)
    rng = np.random.default_rng(SEED)
    x_train, y_train = make_data(N_TRAIN, rng)
    x_test, y_test = make_data(N_TEST, rng)
    model = train(x_train, y_train)
    print(f"train accuracy {accuracy(model, x_train, y_train):.4f}")
    print(f"test accuracy  {accuracy(model, x_test, y_test):.4f}  ({N_TEST} sequences; "
          f"always predicting 1 scores {y_test.mean():.4f})")

    data = x_test[:200]
    export_torch(model, data, HERE / "stacked_lstm.onnx", output_names=["probability"])
    np.save(HERE / "stacked_lstm_data.npy", data)
    for name in ("stacked_lstm.onnx", "stacked_lstm_data.npy"):
        print(f"wrote {name} ({(HERE / name).stat().st_size / 1024:.1f} KB)")


if __name__ == "__main__":
    main()
