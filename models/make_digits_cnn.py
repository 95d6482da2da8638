"""Train a small CNN on scikit-learn's 8×8 digits and export it to ``digits_cnn.onnx``.

Model: Conv(1→8, 3×3, pad 1) ReLU MaxPool 2 → Conv(8→16, 3×3, pad 1) ReLU MaxPool 2 → Flatten →
Linear(64→64) ReLU → Linear(64→10). Input ``input``: float32 (batch, 1, 8, 8), pixels scaled to [0, 1].
Output ``logits``: float32 (batch, 10), one logit per digit 0-9 (no softmax).

Writes next to this script:
    digits_cnn.onnx          the exported model (checked against PyTorch by ``converters.export_torch``)
    digits_sample.npy        16 test images, float32 (16, 1, 8, 8), one or two of each digit
    digits_background.npy    32 training images, float32 (32, 1, 8, 8), a random draw

Deterministic (seeded, single-threaded); runs in a few seconds on a CPU. Run: ``python models/make_digits_cnn.py``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from onnxshap.converters import export_torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

HERE = Path(__file__).resolve().parent

SEED = 0
EPOCHS = 40
BATCH = 64


class DigitsCNN(torch.nn.Module):
    """Two conv blocks and a two-layer head over 1×8×8 images; returns 10 logits."""

    def __init__(self) -> None:
        super().__init__()
        self.features = torch.nn.Sequential(
            torch.nn.Conv2d(1, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
            torch.nn.Conv2d(8, 16, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        )
        self.head = torch.nn.Sequential(
            torch.nn.Flatten(), torch.nn.Linear(16 * 2 * 2, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def load_data() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Digits as float32 (n, 1, 8, 8) in [0, 1], split 75/25 stratified: x_train, x_test, y_train, y_test."""
    digits = load_digits()
    x = (digits.images / 16.0).astype(np.float32)[:, None]
    return train_test_split(x, digits.target, test_size=0.25, random_state=SEED, stratify=digits.target)


def train(x: np.ndarray, y: np.ndarray) -> DigitsCNN:
    """Adam, cross-entropy, fixed-seed mini-batches."""
    torch.manual_seed(SEED)
    model = DigitsCNN()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y).long()
    generator = torch.Generator().manual_seed(SEED)
    for _ in range(EPOCHS):
        for idx in torch.randperm(len(xt), generator=generator).split(BATCH):
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(model(xt[idx]), yt[idx]).backward()
            optimizer.step()
    return model.eval()


def accuracy(model: DigitsCNN, x: np.ndarray, y: np.ndarray) -> float:
    with torch.no_grad():
        return float((model(torch.from_numpy(x)).argmax(1).numpy() == y).mean())


def sample_indices(y: np.ndarray, count: int) -> np.ndarray:
    """``count`` indices cycling through the digits 0-9 (first unused example of each in turn)."""
    picked: list[int] = []
    while len(picked) < count:
        for digit in range(10):
            candidates = [i for i in np.flatnonzero(y == digit) if i not in picked]
            if candidates and len(picked) < count:
                picked.append(int(candidates[0]))
    return np.array(picked)


def main() -> None:
    torch.set_num_threads(1)
    x_train, x_test, y_train, y_test = load_data()
    model = train(x_train, y_train)
    print(f"train accuracy {accuracy(model, x_train, y_train):.4f}")
    print(f"test accuracy  {accuracy(model, x_test, y_test):.4f}  ({len(y_test)} images)")

    sample = x_test[sample_indices(y_test, 16)]
    background = x_train[np.random.default_rng(SEED).choice(len(x_train), 32, replace=False)]
    export_torch(model, background, HERE / "digits_cnn.onnx", output_names=["logits"])
    np.save(HERE / "digits_sample.npy", sample)
    np.save(HERE / "digits_background.npy", background)
    for name in ("digits_cnn.onnx", "digits_sample.npy", "digits_background.npy"):
        print(f"wrote {name} ({(HERE / name).stat().st_size / 1024:.1f} KB)")


if __name__ == "__main__":
    main()
