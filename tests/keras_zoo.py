"""Keras applications and a Keras transformer block, random init, converted with tf2onnx (helpers for
``test_arch_zoo.py``, not tests).

* ``keras.applications`` MobileNetV2, ResNet50, EfficientNetB0 and DenseNet121 with ``weights=None`` at
  64×64×3 and 10 classes (their default softmax head);
* a transformer encoder block: ``MultiHeadAttention`` (2 heads), residual, ``LayerNormalization``, a
  ``Dense(activation="gelu")`` on the 3-D sequence, ``Dense``, residual, ``LayerNormalization``, average
  pooling over the sequence and a ``Dense`` head.

BatchNormalization layers get random affine parameters and the moving statistics of the data they see:
with ``momentum = 0`` one ``training=True`` call sets ``moving_mean``/``moving_variance`` to that batch's
statistics, layer by layer in the order the network normalises (:func:`recalibrate_batchnorm`). Exports
go through ``converters.export_keras`` (checked against ``model(x, training=False)`` on two batch sizes)
and are cached on disk like the torch exports.
"""

from __future__ import annotations

import functools
import hashlib
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx

SEED = 0
N, M = 2, 3  # rows explained, background rows (ResNet50/DenseNet121: keep the pair batch small)
CLASSES = 10
IMAGE = (64, 64, 3)
SEQUENCE = (6, 8)  # transformer block: steps, width


def _keras():
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import keras

    return keras


def _application(name: str) -> Callable:
    def build():
        keras = _keras()
        return getattr(keras.applications, name)(weights=None, input_shape=IMAGE, classes=CLASSES)

    return build


def transformer_block():
    """MultiHeadAttention + LayerNormalization + Dense(gelu) on (batch, 6, 8), pooled, Dense(3)."""
    keras = _keras()
    layers = keras.layers
    inputs = keras.Input(SEQUENCE)
    attended = layers.MultiHeadAttention(num_heads=2, key_dim=4)(inputs, inputs)
    x = layers.LayerNormalization()(inputs + attended)
    hidden = layers.Dense(16, activation="gelu")(x)
    x = layers.LayerNormalization()(x + layers.Dense(SEQUENCE[1])(hidden))
    outputs = layers.Dense(3)(layers.GlobalAveragePooling1D()(x))
    return keras.Model(inputs, outputs)


BUILDERS: dict[str, Callable] = {
    "keras_mobilenet_v2": _application("MobileNetV2"),
    "keras_resnet50": _application("ResNet50"),
    "keras_efficientnet_b0": _application("EfficientNetB0"),
    "keras_densenet121": _application("DenseNet121"),
    "keras_transformer": transformer_block,
}
SHAPES = {name: SEQUENCE if name == "keras_transformer" else IMAGE for name in BUILDERS}


def draw(name: str, rows: int, seed: int) -> np.ndarray:
    """Standard-normal float32 inputs of the model's shape."""
    return np.random.default_rng(seed).standard_normal((rows, *SHAPES[name]), dtype=np.float32)


def data(name: str) -> tuple[np.ndarray, np.ndarray]:
    """``(X, background)``: N explained rows and M background rows, disjoint draws."""
    return draw(name, N, SEED + 1), draw(name, M, SEED + 2)


def recalibrate_batchnorm(model, batch: np.ndarray) -> None:
    """Random BatchNorm affine parameters (``γ ~ U(0.5, 1.5)``, ``β ~ N(0, 0.2²)``), then one
    ``training=True`` call with ``momentum = 0``: every moving statistic becomes the batch statistic of the
    activations that layer sees."""
    keras = _keras()
    rng = np.random.default_rng(SEED + 5)
    norms = [layer for layer in model._flatten_layers() if isinstance(layer, keras.layers.BatchNormalization)]
    for bn in norms:
        shape = tuple(bn.gamma.shape)
        bn.gamma.assign(rng.uniform(0.5, 1.5, shape).astype(np.float32))
        bn.beta.assign(rng.normal(0.0, 0.2, shape).astype(np.float32))
        bn.momentum = 0.0
    model(batch, training=True)
    for bn in norms:
        bn.momentum = 0.99


@functools.cache
def model(name: str):
    """The seeded, calibrated Keras model (cached: read-only)."""
    keras = _keras()
    keras.utils.set_random_seed(SEED)
    net = BUILDERS[name]()
    recalibrate_batchnorm(net, draw(name, 32, SEED + 3))
    return net


def outputs(net, x: np.ndarray) -> np.ndarray:
    """``net(x, training=False)`` flattened to ``(rows, k)`` float64."""
    out = np.asarray(net(x, training=False))
    return out.reshape(len(out), -1).astype(np.float64)


def _source_key() -> str:
    import keras
    import tensorflow as tf
    import tf2onnx

    root = Path(__file__).resolve().parents[1]
    sources = [Path(__file__), *sorted((root / "converters").glob("*.py")), root / "onnxshap" / "graph" / "standard.py"]
    text = b"".join(p.read_bytes() for p in sources)
    text += f"{keras.__version__} {tf.__version__} {tf2onnx.__version__}".encode()
    return hashlib.sha256(text).hexdigest()[:12]


def export(name: str, folder: Path) -> onnx.ModelProto:
    """The tf2onnx export of ``model(name)`` through ``converters.export_keras``, cached as
    ``folder/<name>-tf2onnx-<key>.onnx`` (see ``arch_zoo.cached_export``)."""
    from arch_zoo import cached_export

    from converters import export_keras

    path = Path(folder) / f"{name}-tf2onnx-{_source_key()}.onnx"
    x, _ = data(name)
    return cached_export(path, lambda: export_keras(model(name), x, path))
