"""Seeded model zoo for the reference-agreement tests (helpers, not tests).

Everything here is deterministic: weights come from ``torch.manual_seed``, data from seeded numpy
generators, and nothing is downloaded. Builders return fresh objects; the ``cached_*`` accessors memoise
the expensive parts (ONNX exports, the Keras twin) for the whole test session and hand out fresh copies,
so a test may mutate what it gets.

Models are written so that both reference implementations see every nonlinearity: each activation /
pooling is its *own* leaf ``nn.Module`` instance, used exactly once (shap and Captum hook leaf modules and
keep per-module state; a functional ``torch.relu`` or a reused module would silently fall back to the
plain gradient or corrupt that state).
"""

from __future__ import annotations

import functools
import io
import os
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

SEED = 0
N_SAMPLES = 5  # rows explained
N_BACKGROUND = 20  # background (reference) rows
IR_VERSION = 10
OPSET = 17

# input shape (without batch) of each zoo model
INPUT_SHAPES: dict[str, tuple[int, ...]] = {
    "mlp": (20,),
    "mnist_cnn": (1, 28, 28),
    "bn_cnn": (3, 12, 12),
    "linear": (7,),
}


# --------------------------------------------------------------------------------------------------
# PyTorch models
# --------------------------------------------------------------------------------------------------


def _finish(model: nn.Module, softmax: bool) -> nn.Module:
    if softmax:
        model = nn.Sequential(model, nn.Softmax(dim=1))
    return model.eval()


def mlp(softmax: bool = False, seed: int = SEED) -> nn.Module:
    """20 → 32 ReLU → 16 Tanh → 3 (logits), optionally followed by Softmax."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(20, 32), nn.ReLU(), nn.Linear(32, 16), nn.Tanh(), nn.Linear(16, 3))
    return _finish(model, softmax)


class NewTensor(nn.Module):
    """``x * 1.0``: the same values in a new tensor (exact in floating point; has no parameters).

    Captum 0.9 hooks a nonlinear module through tensor hooks: one on its *output* tensor records the
    incoming gradient, one on its *input* tensor rewrites the outgoing one. When a hooked module feeds
    another directly (ReLU → MaxPool2d), both hooks sit on the same tensor and the ReLU's output hook runs
    first, so it records the *plain* max-pool gradient instead of the DeepLIFT multiplier the MaxPool hook
    then writes: the ReLU rescales the wrong thing and additivity is lost (measured: 5.6e-2 on
    ``mnist_cnn``). Putting this module between them gives each hook its own tensor; Captum is then additive
    to 1e-16 in float64 and equals shap's values.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 1.0


def mnist_cnn(softmax: bool = False, seed: int = SEED, captum_safe: bool = False) -> nn.Module:
    """The classic Keras/PyTorch MNIST example net, input 1×28×28, 10 logits.

    ``captum_safe=True`` inserts :class:`NewTensor` between each ReLU and the MaxPool2d it feeds: the same
    function with the same weights (it has no parameters, so the seeded initialisation is unchanged).
    """
    torch.manual_seed(seed)
    sep = [NewTensor()] if captum_safe else []
    model = nn.Sequential(
        nn.Conv2d(1, 32, 3),
        nn.ReLU(),
        *sep,
        nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3),
        nn.ReLU(),
        *[NewTensor() for _ in sep],
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(64 * 5 * 5, 128),
        nn.ReLU(),
        nn.Linear(128, 10),
    )
    return _finish(model, softmax)


class BNCNN(nn.Module):
    """Conv → BatchNorm → LeakyReLU, a residual block around a depthwise conv, AvgPool, Linear logits.

    ``h = act1(bn1(conv1(x)))``; ``s = h + act2(bn2(dwconv(h)))`` (depthwise: groups = channels);
    ``out = fc(flatten(act3(conv3(avgpool(s)))))``. Input 3×12×12, 5 logits.

    ``act`` picks the activation class (LeakyReLU by default). The residual's skip tensor ``h`` is the
    *output* of a nonlinearity, never the input of one: Captum hooks the *input tensor* of each
    nonlinear module and would overwrite the gradient of a tensor that also feeds another branch.
    """

    def __init__(self, act: type[nn.Module] = nn.LeakyReLU):
        super().__init__()

        def make_act() -> nn.Module:
            return act(0.1) if act is nn.LeakyReLU else act()

        c = 8
        self.conv1 = nn.Conv2d(3, c, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(c)
        self.act1 = make_act()
        self.dwconv = nn.Conv2d(c, c, 3, padding=1, groups=c)
        self.bn2 = nn.BatchNorm2d(c)
        self.act2 = make_act()
        self.pool = nn.AvgPool2d(2)
        self.conv3 = nn.Conv2d(c, 16, 3, stride=2, padding=1)
        self.act3 = make_act()
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(16 * 3 * 3, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act1(self.bn1(self.conv1(x)))
        s = h + self.act2(self.bn2(self.dwconv(h)))
        return self.fc(self.flatten(self.act3(self.conv3(self.pool(s)))))


def bn_cnn(softmax: bool = False, seed: int = SEED, act: type[nn.Module] = nn.LeakyReLU) -> nn.Module:
    """:class:`BNCNN` in eval mode with non-trivial BatchNorm running stats and affine parameters."""
    torch.manual_seed(seed)
    model = BNCNN(act)
    with torch.no_grad():
        for bn in (model.bn1, model.bn2):
            c = bn.num_features
            bn.running_mean.copy_(0.5 * torch.randn(c))
            bn.running_var.copy_(0.5 + torch.rand(c))
            bn.weight.copy_(1.0 + 0.3 * torch.randn(c))
            bn.bias.copy_(0.2 * torch.randn(c))
    return _finish(model, softmax)


def linear(seed: int = SEED) -> nn.Module:
    """A single ``nn.Linear(7, 3)``: Deep SHAP values are exactly ``(x − mean(background)) · w``."""
    torch.manual_seed(seed)
    return nn.Linear(7, 3).eval()


BUILDERS = {"mlp": mlp, "mnist_cnn": mnist_cnn, "bn_cnn": bn_cnn}


# --------------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------------


def data(
    name: str, n: int = N_SAMPLES, m: int = N_BACKGROUND, seed: int = SEED
) -> tuple[np.ndarray, np.ndarray]:
    """``(X, background)`` float32 arrays for zoo model ``name`` (seeded, disjoint draws).

    Image models get non-negative, pixel-like inputs in [0, 1); vector models standard normals.
    Continuous random values keep exact ties (e.g. in MaxPool windows) away: tie-breaking is arbitrary and
    not what these tests are about.
    """
    shape = INPUT_SHAPES[name]
    rng = np.random.default_rng(seed + 1000 * sum(map(ord, name)))
    if len(shape) == 3:
        x = rng.random((n + m, *shape), dtype=np.float32)
    else:
        x = rng.standard_normal((n + m, *shape), dtype=np.float32)
    return np.ascontiguousarray(x[:n]), np.ascontiguousarray(x[n:])


# --------------------------------------------------------------------------------------------------
# ONNX export and running
# --------------------------------------------------------------------------------------------------


def run_onnx(model: onnx.ModelProto | bytes, *inputs: np.ndarray) -> np.ndarray:
    """Run ``model`` on stock ONNX Runtime (CPU) and return its first output."""
    data_ = model if isinstance(model, bytes) else model.SerializeToString()
    sess = ort.InferenceSession(data_, providers=["CPUExecutionProvider"])
    feeds = {i.name: np.asarray(x) for i, x in zip(sess.get_inputs(), inputs)}
    return sess.run(None, feeds)[0]


def torch_forward(module: nn.Module, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return module(torch.from_numpy(np.asarray(x, dtype=np.float32))).numpy()


def assert_close_scaled(actual: np.ndarray, desired: np.ndarray, rel: float, what: str = "") -> float:
    """``max|a − b| ≤ rel · max(max|b|, 1e-6)``; returns the relative error measured that way."""
    actual = np.asarray(actual, dtype=np.float64)
    desired = np.asarray(desired, dtype=np.float64)
    assert actual.shape == desired.shape, f"{what}: shape {actual.shape} != {desired.shape}"
    err = float(np.max(np.abs(actual - desired))) / max(float(np.max(np.abs(desired))), 1e-6)
    assert err <= rel, f"{what}: relative error {err:.3g} > {rel:g}"
    return err


def export_onnx(
    module: nn.Module, example: torch.Tensor | np.ndarray, dynamo: bool = False
) -> onnx.ModelProto:
    """Export ``module`` with a dynamic batch axis, opset 17, ``ir_version`` 10, and verify it with ORT.

    ``dynamo=False``: the TorchScript exporter with ``dynamic_axes``; ``dynamo=True``: the torch.export
    based exporter with ``dynamic_shapes``. The export is checked against torch on the example and on a
    batch of a different size (which exercises the dynamic axis).
    """
    module = module.eval()
    example = torch.as_tensor(np.asarray(example, dtype=np.float32))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if dynamo:
            batch = torch.export.Dim("batch")
            program = torch.onnx.export(
                module,
                (example,),
                dynamo=True,
                dynamic_shapes=({0: batch},),
                opset_version=OPSET,
                input_names=["x"],
                output_names=["y"],
                verbose=False,
            )
            model = program.model_proto
        else:
            buf = io.BytesIO()
            torch.onnx.export(
                module,
                (example,),
                buf,
                dynamo=False,
                opset_version=OPSET,
                input_names=["x"],
                output_names=["y"],
                dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}},
            )
            model = onnx.load_from_string(buf.getvalue())
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model, full_check=True)

    # numerical check against torch, on the example and on a batch of another size
    rng = np.random.default_rng(SEED)
    other = rng.standard_normal((example.shape[0] + 2, *example.shape[1:]), dtype=np.float32)
    for x in (example.numpy(), other):
        assert_close_scaled(run_onnx(model, x), torch_forward(module, x), 1e-5, "ONNX export vs torch")
    return model


# --------------------------------------------------------------------------------------------------
# Keras (keras 3 on TensorFlow) twin of mnist_cnn, converted with tf2onnx
# --------------------------------------------------------------------------------------------------


def _quiet_tf() -> None:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def keras_mnist_twin(torch_model: nn.Module):
    """A keras-3 NHWC copy of :func:`mnist_cnn` (no Softmax) carrying the torch model's weights.

    Conv kernels go OIHW → HWIO. The first Dense layer's rows are permuted: torch flattens (C, H, W),
    Keras flattens (H, W, C), so row ``h·5·64 + w·64 + c`` of the Keras kernel is column
    ``c·25 + h·5 + w`` of the torch weight.
    """
    _quiet_tf()
    import keras

    convs = [m for m in torch_model.modules() if isinstance(m, nn.Conv2d)]
    fcs = [m for m in torch_model.modules() if isinstance(m, nn.Linear)]
    assert len(convs) == 2 and len(fcs) == 2, "expects mnist_cnn(softmax=False)"
    layers = keras.layers
    kmodel = keras.Sequential(
        [
            keras.Input((28, 28, 1), name="x"),
            layers.Conv2D(32, 3, activation="relu"),
            layers.MaxPooling2D(2),
            layers.Conv2D(64, 3, activation="relu"),
            layers.MaxPooling2D(2),
            layers.Flatten(),
            layers.Dense(128, activation="relu"),
            layers.Dense(10),
        ]
    )
    kconvs = [m for m in kmodel.layers if isinstance(m, layers.Conv2D)]
    kdense = [m for m in kmodel.layers if isinstance(m, layers.Dense)]
    for kc, tc in zip(kconvs, convs):
        kc.set_weights([tc.weight.detach().numpy().transpose(2, 3, 1, 0), tc.bias.detach().numpy()])
    w1 = fcs[0].weight.detach().numpy()  # (128, 64·5·5), columns in (c, h, w) order
    w1 = w1.reshape(128, 64, 5, 5).transpose(2, 3, 1, 0).reshape(64 * 5 * 5, 128)
    kdense[0].set_weights([w1, fcs[0].bias.detach().numpy()])
    kdense[1].set_weights([fcs[1].weight.detach().numpy().T, fcs[1].bias.detach().numpy()])
    return kmodel


def keras_to_onnx(kmodel, input_shape: tuple[int, ...]) -> onnx.ModelProto:
    """Convert a keras-3 model with tf2onnx (dynamic batch), opset 17, ``ir_version`` 10.

    ``tf2onnx.convert.from_keras`` (tf2onnx 1.17) fails on keras-3 models (``KeyError: 'keras_tensor_N'``
    inside its keras-2 graph handling), so the model is wrapped in a ``tf.function`` with a dynamic-batch
    input signature and converted with ``from_function``.
    """
    _quiet_tf()
    import tensorflow as tf
    import tf2onnx

    spec = [tf.TensorSpec((None, *input_shape), tf.float32, name="x")]
    fn = tf.function(lambda x: kmodel(x, training=False))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, _ = tf2onnx.convert.from_function(fn, input_signature=spec, opset=OPSET)
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model, full_check=True)
    return model


# --------------------------------------------------------------------------------------------------
# Session-wide caches (fresh copies out, so callers may mutate)
# --------------------------------------------------------------------------------------------------


@functools.cache
def _onnx_bytes(name: str, softmax: bool, dynamo: bool) -> bytes:
    module = BUILDERS[name](softmax=softmax)
    x, _ = data(name)
    return export_onnx(module, x[:3], dynamo=dynamo).SerializeToString()


def cached_onnx(name: str, softmax: bool = False, dynamo: bool = False) -> onnx.ModelProto:
    """The (cached) ONNX export of ``BUILDERS[name](softmax=softmax)``; a fresh ModelProto each call."""
    return onnx.load_from_string(_onnx_bytes(name, softmax, dynamo))


@functools.cache
def _linear_onnx_bytes() -> bytes:
    x, _ = data("linear")
    return export_onnx(linear(), x[:3]).SerializeToString()


def cached_linear_onnx() -> onnx.ModelProto:
    return onnx.load_from_string(_linear_onnx_bytes())


@functools.cache
def _keras_twin_bytes() -> bytes:
    tmodel = mnist_cnn()
    kmodel = keras_mnist_twin(tmodel)
    x, bg = data("mnist_cnn")
    xs = np.concatenate([x, bg])
    # the twin must compute the torch model's function on NHWC-transposed inputs
    k_out = np.asarray(kmodel(xs.transpose(0, 2, 3, 1), training=False))
    assert_close_scaled(k_out, torch_forward(tmodel, xs), 1e-4, "keras twin vs torch")
    model = keras_to_onnx(kmodel, (28, 28, 1))
    assert_close_scaled(run_onnx(model, xs.transpose(0, 2, 3, 1)), k_out, 1e-5, "tf2onnx vs keras")
    return model.SerializeToString()


def cached_keras_twin_onnx() -> onnx.ModelProto:
    """tf2onnx export of the keras twin of ``mnist_cnn()`` (input NHWC ``(batch, 28, 28, 1)``)."""
    return onnx.load_from_string(_keras_twin_bytes())
