"""The benchmark's models, with seeded random weights (helpers for ``run.py``, no work at import).

- ``mlp``: Linear 20→64→32→3 with ReLUs;
- ``cnn``: Conv(1→32, 3) ReLU MaxPool 2 → Conv(32→64, 3) ReLU MaxPool 2 → Linear(1600→128) ReLU → Linear(128→10)
  on 1×28×28;
- ``runoff_lstm``: LSTM(9→32) on 12 steps, a Linear head on the last step;
- ``stacked_lstm``: LSTM(3→10) → LSTM(10→5) → LSTM(5→1) on 10 steps, a Linear head on the last step;
- ``keras_bilstm``: Keras 3 Bidirectional(LSTM(16, sequences)) → Bidirectional(LSTM(16)) → Dense(1) on 12×9,
  passed to onnxshap as the Keras model (exported on the fly);
- ``resnet18``: torchvision's ResNet-18 layout (7×7/2 stem, max pool, 2+2+2+2 BasicBlocks of 64/128/256/512,
  average pool, 1000 classes), written from ``tests/arch_zoo.py``'s blocks (torchvision does not import here);
  BatchNorm statistics from one pass over random images so activations stay O(1).
"""

from __future__ import annotations

import itertools
import os
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
TORCH_MODELS = ("mlp", "cnn", "runoff_lstm", "stacked_lstm", "resnet18")
KERAS_MODELS = ("keras_bilstm",)
SHAPES = {"mlp": (20,), "cnn": (1, 28, 28), "runoff_lstm": (12, 9), "stacked_lstm": (10, 3),
          "keras_bilstm": (12, 9), "resnet18": (3, 224, 224)}
RECURRENT = ("runoff_lstm", "stacked_lstm", "keras_bilstm")


def build_model(name: str):
    """The model (a torch module in eval mode, or a Keras model) with seeded random weights."""
    if name in KERAS_MODELS:
        return _keras_bilstm()
    import torch
    from torch import nn

    torch.manual_seed(0)
    if name == "mlp":
        return nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 3)).eval()
    if name == "cnn":
        return nn.Sequential(
            nn.Conv2d(1, 32, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(32, 64, 3), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(64 * 5 * 5, 128), nn.ReLU(), nn.Linear(128, 10)).eval()
    if name == "resnet18":
        return _resnet18()

    class Recurrent(nn.Module):
        def __init__(self, features: int, hidden: list[int]) -> None:
            super().__init__()
            sizes = [features] + hidden
            self.layers = nn.ModuleList(nn.LSTM(a, b, batch_first=True) for a, b in itertools.pairwise(sizes))
            self.head = nn.Linear(hidden[-1], 1)

        def forward(self, x):
            for layer in self.layers:
                x, _ = layer(x)
            return self.head(x[:, -1])

    if name == "runoff_lstm":
        return Recurrent(9, [32]).eval()
    if name == "stacked_lstm":
        return Recurrent(3, [10, 5, 1]).eval()
    raise ValueError(name)


def _resnet18():
    sys.path.insert(0, str(ROOT / "tests"))
    from arch_zoo import resnet18

    return resnet18(224)


def hook_safe(model):
    """The same function for shap's and Captum's module hooks: torchvision's blocks reuse one in-place ReLU and
    add the shortcut in place (``out += identity``), which shap's PyTorch DeepExplainer refuses ("a view ...
    modified inplace") and which would make DeepLift's per-module hooks see one ReLU twice. Each BasicBlock
    gets two ReLUs and an out-of-place add; every ReLU is made out-of-place. The weights are shared."""
    import copy
    import types

    from torch import nn

    sys.path.insert(0, str(ROOT / "tests"))
    from arch_zoo import BasicBlock

    def forward(block, x):
        out = block.relu_inner(block.bn1(block.conv1(x)))
        out = block.bn2(block.conv2(out))
        identity = x if block.downsample is None else block.downsample(x)
        return block.relu_outer(out + identity)

    twin = copy.deepcopy(model)
    for module in twin.modules():
        if isinstance(module, nn.ReLU):
            module.inplace = False
        if isinstance(module, BasicBlock):
            module.relu_inner, module.relu_outer = nn.ReLU(), nn.ReLU()
            module.forward = types.MethodType(forward, module)
    return twin.eval()


def _keras_bilstm():
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import keras

    keras.utils.set_random_seed(0)
    inputs = keras.Input(SHAPES["keras_bilstm"])
    hidden = keras.layers.Bidirectional(keras.layers.LSTM(16, return_sequences=True))(inputs)
    hidden = keras.layers.Bidirectional(keras.layers.LSTM(16))(hidden)
    return keras.Model(inputs, keras.layers.Dense(1)(hidden))


def make_data(name: str, n: int, m: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` rows to explain and ``m`` background rows, uniform in [0, 1), seeded."""
    rng = np.random.default_rng(0)
    shape = SHAPES[name]
    return rng.random((n, *shape), dtype=np.float32), rng.random((m, *shape), dtype=np.float32)


def predict(model, x: np.ndarray) -> np.ndarray:
    """The model's outputs (n, k) in float64."""
    if hasattr(model, "state_dict"):
        import torch

        with torch.no_grad():
            return model(torch.tensor(x)).numpy().astype(np.float64)
    return np.asarray(model(x, training=False), dtype=np.float64)


def keras_twin_weights(module) -> dict:
    """``write_input`` arguments of ``legacy_shap.py`` for a torch ``Recurrent`` stack of one-direction LSTMs."""
    import legacy_shap

    layers = [legacy_shap.keras_lstm_weights(*(getattr(lstm, f"{p}_l0").detach().numpy()
                                               for p in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")))
              for lstm in module.layers]
    kernel, recurrent, bias = layers[-1]
    return {"cell": "lstm", "kernel": kernel, "recurrent_kernel": recurrent, "bias": bias,
            "below": [tuple(weights) for weights in layers[:-1]],
            "dense_kernel": module.head.weight.detach().numpy().T, "dense_bias": module.head.bias.detach().numpy()}
