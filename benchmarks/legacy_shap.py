"""shap.DeepExplainer on a one-layer tf_keras LSTM/GRU through shap's legacy TF1 graph path.

shap 0.51's only exact path for recurrent Keras models is its TF1-style one: ``tf.gradients`` over a static
graph with shap's DeepLIFT handlers swapped into TensorFlow's gradient registry. Under TensorFlow 2.21 that
needs, measured here:

* ``TF_USE_LEGACY_KERAS=1`` set before TensorFlow is imported (``tf.keras`` is then tf_keras, Keras 2; a
  Keras 3 model is not a graph-mode model shap can walk);
* ``tf.compat.v1.disable_v2_behavior()`` before the model is built. Its parts matter:
  - eager mode (nothing disabled) fails inside the LSTM with ``AttributeError: 'TFDeep' object has no
    attribute 'between_tensors'`` (shap's eager branch builds the gradient graph inside a ``tf.function``
    and looks up ``between_tensors`` before ``_init_between_tensors`` has run);
  - ``tf.compat.v1.disable_eager_execution()`` alone runs, but the RNN is then a control-flow-v2 ``While``
    op whose body shap never visits: every SHAP value comes out exactly 0;
  - adding only ``tf.compat.v1.disable_control_flow_v2()`` fails at run time with ``TensorArray
    output_ta_0_0: Could not write to TensorArray index 0 because it has already been written to`` (the
    v1 ``while_loop`` with resource variables);
  - the whole ``disable_v2_behavior()`` (graph mode, control flow v1, reference variables) works: the loop
    is ``Enter``/``Merge``/``Switch``/``NextIteration``/``Exit`` + ``TensorArray*V3`` ops, which shap passes
    through, and every gate's ``Sigmoid``/``Tanh``/``Mul`` gets shap's rescale / Shapley handler.

Input ``.npz`` (one model, its weights in Keras layout, the data)::

    cell              "lstm" or "gru"
    units, T, F       hidden size, sequence length, number of variables
    head              "last": Dense on the last step's hidden state; "flat": Dense on the flattened sequence
    kernel            (F, G·units)     G = 4 (LSTM gates i, f, c, o) or 3 (GRU gates z, r, h)
    recurrent_kernel  (units, G·units)
    bias              LSTM (4·units,); GRU (2, 3·units): input and recurrent biases (``reset_after=True``)
    layers            optional, default 1: a stack of that many recurrent layers (each but the last returns
                      sequences); layer j's weights are ``kernel_j``, ``recurrent_kernel_j``, ``bias_j``
                      (``units_j`` hidden units) and ``kernel`` etc. are the last layer's
    dense_kernel      (units or T·units, k)
    dense_bias        (k,)
    x                 (n, T, F) rows to explain
    background        (m, T, F) background rows
    unroll            optional, default 0: build the Keras layer with ``unroll=True``
    go_backwards      optional, default 0: build the Keras layer with ``go_backwards=True``
    mask_value        optional: a ``Masking(mask_value)`` layer before the recurrent layer (steps whose
                      features all equal it are skipped: the state is carried over)

Output ``.npz``::

    shap_values       (n, T, F, k) float64
    expected_value    (k,) float64: the mean model output over the background
    predictions       (n, k) and ``background_predictions`` (m, k): the tf_keras model's outputs
    seconds           wall time of ``explainer.shap_values(x)`` (additivity check off)
    setup_seconds     wall time of ``shap.DeepExplainer(model, background)``
    process_seconds   wall time from the script's start (before TensorFlow is imported) to the end of that
                      ``shap_values`` call: the whole cold start of a fresh TF1 process (first model only)
    versions          "tensorflow X, tf_keras Y, shap Z"

Usage (several pairs share one TensorFlow start-up, ~10 s)::

    python benchmarks/legacy_shap.py in.npz out.npz [in2.npz out2.npz ...]

The helpers ``keras_lstm_weights`` / ``keras_gru_weights`` (torch → Keras layout), ``write_input`` and
``run`` (the script in a subprocess) import neither TensorFlow nor torch, so tests and benchmarks can import
this file without changing their own process.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np

STARTED = time.perf_counter()
SCRIPT = Path(__file__).resolve()
REQUIRED = ("cell", "units", "T", "F", "head", "kernel", "recurrent_kernel", "bias", "dense_kernel",
            "dense_bias", "x", "background")


# -- torch → Keras weight layout (numpy only) ------------------------------------------------------------
def keras_lstm_weights(w_ih, w_hh, b_ih, b_hh) -> list[np.ndarray]:
    """``[kernel, recurrent_kernel, bias]`` of a Keras LSTM equal to a torch ``nn.LSTM`` layer (one direction).

    torch stacks the gates i, f, g, o and Keras i, f, c, o: the same order, so kernel = W_ihᵀ,
    recurrent_kernel = W_hhᵀ and bias = b_ih + b_hh.
    """
    w_ih, w_hh, b_ih, b_hh = (np.asarray(a, dtype=np.float32) for a in (w_ih, w_hh, b_ih, b_hh))
    return [np.ascontiguousarray(w_ih.T), np.ascontiguousarray(w_hh.T), b_ih + b_hh]


def keras_gru_weights(w_ih, w_hh, b_ih, b_hh) -> list[np.ndarray]:
    """``[kernel, recurrent_kernel, bias]`` of a Keras GRU (``reset_after=True``) equal to a torch ``nn.GRU``.

    torch stacks the gates r, z, n and Keras z, r, h; torch's n = tanh(W_in x + b_in + r ⊙ (W_hn h + b_hn))
    is Keras's reset-after candidate, so the blocks are reordered and the bias is (2, 3H): input, recurrent.
    """
    w_ih, w_hh, b_ih, b_hh = (np.asarray(a, dtype=np.float32) for a in (w_ih, w_hh, b_ih, b_hh))
    hidden = w_hh.shape[1]

    def reorder(a):
        r, z, n = np.split(a, 3, axis=0)
        return np.concatenate([z, r, n], axis=0)

    kernel = np.ascontiguousarray(reorder(w_ih).T)
    recurrent = np.ascontiguousarray(reorder(w_hh).T)
    bias = np.stack([reorder(b_ih), reorder(b_hh)])
    assert bias.shape == (2, 3 * hidden)
    return [kernel, recurrent, bias]


def write_input(path, *, cell: str, kernel, recurrent_kernel, bias, dense_kernel, dense_bias, x, background,
                head: str = "last", unroll: bool = False, go_backwards: bool = False,
                mask_value: float | None = None, below: list[tuple] = ()) -> Path:
    """Write the script's input ``.npz`` (shapes are checked here, not in the subprocess).

    ``below``: ``(kernel, recurrent_kernel, bias)`` of the recurrent layers under the last one, lowest first
    (a stacked model; each returns sequences).
    """
    x = np.asarray(x, dtype=np.float32)
    background = np.asarray(background, dtype=np.float32)
    _, steps, features = x.shape
    units = np.asarray(recurrent_kernel).shape[0]
    if cell not in ("lstm", "gru") or head not in ("last", "flat"):
        raise ValueError(f"cell must be lstm/gru and head last/flat; got {cell!r}, {head!r}")
    gates = 4 if cell == "lstm" else 3
    stack = {}
    for j, (k, rk, b) in enumerate(below):
        assert np.shape(k) == (features, gates * np.shape(rk)[0]), np.shape(k)
        features = np.shape(rk)[0]
        stack.update({f"kernel_{j}": np.asarray(k, np.float32), f"recurrent_kernel_{j}": np.asarray(rk, np.float32),
                      f"bias_{j}": np.asarray(b, np.float32)})
    assert np.shape(kernel) == (features, gates * units), np.shape(kernel)
    assert np.shape(recurrent_kernel) == (units, gates * units), np.shape(recurrent_kernel)
    assert np.shape(bias) == ((gates * units,) if cell == "lstm" else (2, gates * units)), np.shape(bias)
    assert np.shape(dense_kernel)[0] == (units if head == "last" else steps * units), np.shape(dense_kernel)
    assert background.shape[1:] == x.shape[1:], (background.shape, x.shape)
    path = Path(path)
    optional = {} if mask_value is None else {"mask_value": np.float32(mask_value)}
    np.savez(path, cell=cell, units=units, T=steps, F=x.shape[2], head=head, unroll=int(unroll),
             go_backwards=int(go_backwards), layers=len(below) + 1, **optional, **stack,
             kernel=np.asarray(kernel, np.float32), recurrent_kernel=np.asarray(recurrent_kernel, np.float32),
             bias=np.asarray(bias, np.float32), dense_kernel=np.asarray(dense_kernel, np.float32),
             dense_bias=np.asarray(dense_bias, np.float32), x=x, background=background)
    return path


def run(pairs, timeout: float = 900) -> list[dict[str, np.ndarray]]:
    """Run this script in a fresh Python on ``[(input.npz, output.npz), ...]``; returns the outputs' contents.

    Raises:
        RuntimeError: the script failed; the message ends with its last lines of stderr.
    """
    args = [str(p) for pair in pairs for p in pair]
    env = dict(os.environ, TF_USE_LEGACY_KERAS="1", TF_CPP_MIN_LOG_LEVEL="3", CUDA_VISIBLE_DEVICES="")
    done = subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout,
                          env=env, check=False)
    if done.returncode != 0:
        tail = "\n".join(done.stderr.strip().splitlines()[-15:])
        raise RuntimeError(f"legacy_shap.py failed (exit {done.returncode}):\n{tail}")
    results = []
    for _, out in pairs:
        with np.load(out) as data:
            results.append({k: data[k] for k in data.files})
    return results


# -- the subprocess side ---------------------------------------------------------------------------------
def _import_legacy_tensorflow():
    """TensorFlow in TF1 graph mode with tf_keras as ``tf.keras``; must run before anything imports TF."""
    if "tensorflow" in sys.modules and os.environ.get("TF_USE_LEGACY_KERAS") != "1":
        raise RuntimeError("TensorFlow was imported before TF_USE_LEGACY_KERAS=1 was set")
    os.environ["TF_USE_LEGACY_KERAS"] = "1"
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import tensorflow as tf

    tf.get_logger().setLevel("ERROR")
    tf.compat.v1.disable_v2_behavior()
    import tf_keras

    return tf, tf_keras


def _build(tf_keras, spec: dict):
    """The tf_keras model of ``spec`` with its weights set."""
    cell, units, steps, features = spec["cell"], spec["units"], spec["T"], spec["F"]
    flat = spec["head"] == "flat"
    layers = tf_keras.layers
    inputs = tf_keras.Input((steps, features), name="x")
    common = {"activation": "tanh", "recurrent_activation": "sigmoid", "return_sequences": flat,
              "unroll": bool(spec.get("unroll", 0)), "go_backwards": bool(spec.get("go_backwards", 0)),
              "name": "recurrent"}
    if cell == "lstm":
        layer = layers.LSTM(units, **common)
    elif cell == "gru":
        layer = layers.GRU(units, reset_after=True, **common)
    else:
        raise ValueError(f"unknown cell {cell!r}")
    masked = layers.Masking(float(spec["mask_value"]))(inputs) if "mask_value" in spec else inputs
    for j in range(spec.get("layers", 1) - 1):  # a stack: the layers below return sequences
        below_units = spec[f"recurrent_kernel_{j}"].shape[0]
        below = layers.LSTM(below_units, **{**common, "return_sequences": True, "name": f"recurrent_{j}"}) \
            if cell == "lstm" else layers.GRU(below_units, reset_after=True,
                                              **{**common, "return_sequences": True, "name": f"recurrent_{j}"})
        masked = below(masked)
        below.set_weights([spec[f"kernel_{j}"], spec[f"recurrent_kernel_{j}"], spec[f"bias_{j}"]])
    hidden = layer(masked)
    if flat:
        hidden = layers.Flatten()(hidden)
    dense = layers.Dense(spec["dense_kernel"].shape[1], name="head")
    model = tf_keras.Model(inputs, dense(hidden))
    layer.set_weights([spec["kernel"], spec["recurrent_kernel"], spec["bias"]])
    dense.set_weights([spec["dense_kernel"], spec["dense_bias"]])
    return model


def _load_spec(path) -> dict:
    with np.load(path) as data:
        missing = [k for k in REQUIRED if k not in data.files]
        if missing:
            raise ValueError(f"{path}: missing {', '.join(missing)}")
        spec = {k: data[k] for k in data.files}
    for key in ("cell", "head"):
        spec[key] = str(spec[key])
    for key in ("units", "T", "F", "unroll", "go_backwards", "layers"):
        if key in spec:
            spec[key] = int(spec[key])
    return spec


def explain(tf, tf_keras, shap, spec: dict) -> dict[str, np.ndarray]:
    """Build the model in a fresh default graph, run shap.DeepExplainer, return the output arrays."""
    tf_keras.backend.clear_session()  # a fresh default graph and session per model
    model = _build(tf_keras, spec)
    x = spec["x"].astype(np.float32)
    background = spec["background"].astype(np.float32)
    predictions = model.predict(x, verbose=0)
    background_predictions = model.predict(background, verbose=0)
    start = time.perf_counter()
    explainer = shap.DeepExplainer(model, background)
    setup = time.perf_counter() - start
    start = time.perf_counter()
    values = explainer.shap_values(x, check_additivity=False)
    seconds = time.perf_counter() - start
    values = np.asarray(values, dtype=np.float64)
    if values.ndim == x.ndim:  # a single-output model explained without an output axis
        values = values[..., None]
    return {
        "shap_values": values,
        "expected_value": np.atleast_1d(np.asarray(explainer.expected_value, dtype=np.float64)),
        "predictions": np.asarray(predictions, dtype=np.float64),
        "background_predictions": np.asarray(background_predictions, dtype=np.float64),
        "seconds": np.float64(seconds),
        "setup_seconds": np.float64(setup),
        "process_seconds": np.float64(time.perf_counter() - STARTED),
    }


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or len(argv) % 2 or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    tf, tf_keras = _import_legacy_tensorflow()
    warnings.filterwarnings("ignore")
    import shap

    versions = f"tensorflow {tf.__version__}, tf_keras {tf_keras.__version__}, shap {shap.__version__}"
    for source, target in zip(argv[::2], argv[1::2]):
        result = explain(tf, tf_keras, shap, _load_spec(source))
        result["versions"] = np.array(versions)
        target = Path(target)
        partial = target.with_name(f".{target.name}.partial.npz")
        np.savez(partial, **result)
        os.replace(partial, target)
        print(f"{source} -> {target}: shap_values {result['shap_values'].shape} in {float(result['seconds']):.3f} s"
              f" (setup {float(result['setup_seconds']):.3f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
