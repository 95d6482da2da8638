"""onnxshap against independent Deep SHAP implementations, and the invariants of DESIGN.md section 5.

Tolerances
----------
Values are compared with :func:`rel_err`, a *per-output* scaled error::

    rel_err(a, b) = max_j  max|a[..., j] − b[..., j]|  /  max(max|b[..., j]|, 1e-6)

Each explained output ``j`` is a separate explanation, so its attributions are measured against their own
magnitude (a global scale would let a wrong, small-magnitude output hide behind a large one); elementwise
relative error is meaningless for attributions near zero. The floor 1e-6 only guards an all-zero output.
References are computed in float64 on a float64 copy of the same torch model, so the difference measures
onnxshap's float32 error alone. The float32 noise floor of the *same* algorithm is about 2e-6 on these
models (shap in float32 vs shap in float64: mlp 3.5e-7, mnist_cnn 2.0e-6, bn_cnn 2.7e-6), so ``REL = 1e-4``
leaves a ~50× margin for a different summation order (ONNX Runtime vs torch kernels), while any difference
in a rule shows up at 1e-2 or more (e.g. shap's vs Captum's Softmax handling differ by 7e-2).

Additivity follows DESIGN.md §5.1: for every row and output
``|Σφ − (f(x) − E f(R))| ≤ 1e-4 · max(1, |f(x) − E f(R)|)``, with ``f`` evaluated by ONNX Runtime on the
explained model (never by onnxshap itself).

How the references treat each module (read from their sources, confirmed numerically)
--------------------------------------------------------------------------------------
shap 0.51 ``PyTorchDeep`` (``shap/explainers/_deep/deep_pytorch.py``) puts full backward hooks on *leaf
modules* only; anything done functionally in ``forward`` (the residual ``+``) gets the plain autograd
gradient, which is the exact rule for a linear op.

* ``Linear``, ``Conv*d``, ``ConvTranspose*d``, ``AvgPool*d``, ``AdaptiveAvgPool*d``, ``BatchNorm*d``:
  ``linear_1d`` — gradient unchanged (exact: they are affine in eval mode). ``Flatten``, ``Dropout*``,
  ``Identity``: ``passthrough``.
* ``ReLU``, ``LeakyReLU``, ``ELU``, ``Sigmoid``, ``Tanh``, ``Softplus``, ``SELU``, ``GELU``:
  ``nonlinear_1d`` — rescale ``Δy/Δx``, falling back to the gradient where ``|Δx| < 1e-6``.
* ``Softmax``: also ``nonlinear_1d``, i.e. an *elementwise* rescale ``g_i·Δy_i/Δx_i`` of the whole softmax.
  That is trivially additive (``Σ g_i Δy_i``) but credits the change of ``y_i`` to logit ``i`` alone —
  exactly what DESIGN.md §3 rules out (onnxshap decomposes Softmax). Not a reference for values there.
* ``MaxPool*d``: ``maxpool`` — the cross-max rule (``c = max(z_x, z_r)``; ``M·(c − z_r)`` to the x
  argmax, ``M·(z_x − c)`` to the r argmax via ``max_unpool``), divided by ``Δx``, and *zero* (not the
  gradient) where ``|Δx| < 1e-7``. Same rule as DESIGN.md §3.
* any other module: a warning and the plain gradient.

Captum 0.9 ``DeepLift``/``DeepLiftShap`` (``captum/attr/_core/deep_lift.py``) hooks only
``SUPPORTED_NON_LINEAR``: ``ReLU, ELU, LeakyReLU, Sigmoid, Tanh, Softplus`` (rescale ``Δy/Δx``, gradient
where ``|Δx| < 1e-10``), ``MaxPool1/2/3d`` (the same cross-max rule) and ``Softmax`` (rescale, then minus
the mean over *all elements of the batch* — not additive: 0.49 on ``mlp(softmax=True)``). Everything else
(Linear, Conv, AvgPool, BatchNorm, the residual add) gets the exact autograd gradient. Captum's hooks are
tensor hooks; when one hooked module feeds another directly (ReLU → MaxPool2d) the first one records the
plain gradient instead of the second one's multiplier, and additivity is lost (5.6e-2 on ``mnist_cnn``;
see :class:`zoo.NewTensor`). Its comparison therefore runs on ``mnist_cnn(captum_safe=True)``, the same
function and weights with a no-op between the two.

Measured reference additivity errors (float32 / float64, logits): shap — mlp 6e-8 / 1e-16, mnist_cnn
3e-8 / 6e-17, bn_cnn 3e-8 / 6e-17, with Softmax 1.4e-6 / 7e-16 (mlp); Captum — mlp 5e-8 / 1e-16, bn_cnn
2e-8 / 6e-17, mnist_cnn 5.6e-2 (hook chaining, above) but 5e-17 when ``captum_safe``. shap and Captum agree
with each other to 1e-7 (float32) / 3e-16 (float64) wherever both are valid.
"""

from __future__ import annotations

import functools

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import zoo

import onnxshap

REL = 1e-4  # values vs a float64 reference, per-output scaled (module docstring)
ADD_TOL = 1e-4  # additivity, DESIGN.md §5.1
ORDER_TOL = 1e-5  # same explanation computed with the references in another order (float32 rounding only)
REF_ADD_TOL = 1e-9  # a float64 reference whose rules are all additive is additive to ~1e-16

EXPORTERS = {"torchscript": False, "dynamo": True}
MODEL_EXPORTER = [(name, exp) for name in ("mlp", "mnist_cnn", "bn_cnn") for exp in EXPORTERS]


# --------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------


def rel_err(actual, desired) -> float:
    """Per-output scaled error (module docstring); the last axis indexes the outputs."""
    a = np.asarray(actual, dtype=np.float64)
    b = np.asarray(desired, dtype=np.float64)
    assert a.shape == b.shape, f"shape {a.shape} != reference shape {b.shape}"
    k = b.shape[-1]
    a = a.reshape(-1, k)
    b = b.reshape(-1, k)
    return float(np.max(np.abs(a - b).max(0) / np.maximum(np.abs(b).max(0), 1e-6)))


def additivity_errors(values, fx, expected) -> np.ndarray:
    """(n, k) array of ``|Σφ − (f(x) − E f)| / max(1, |f(x) − E f|)``; ``values`` is (n, ..., k)."""
    values = np.asarray(values, dtype=np.float64)
    n, k = values.shape[0], values.shape[-1]
    total = values.reshape(n, -1, k).sum(1)
    delta = np.asarray(fx, dtype=np.float64) - np.asarray(expected, dtype=np.float64)
    return np.abs(total - delta) / np.maximum(1.0, np.abs(delta))


def t64(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.asarray(x, dtype=np.float64))


def torch64(name: str, **kwargs) -> torch.nn.Module:
    return zoo.BUILDERS[name](**kwargs).double().eval()


def torch_additivity(model: torch.nn.Module, x, bg, values) -> float:
    with torch.no_grad():
        fx = model(t64(x)).numpy()
        expected = model(t64(bg)).numpy().mean(0)
    return float(additivity_errors(values, fx, expected).max())


@functools.cache
def onnxshap_values(name: str, exporter: str) -> tuple[np.ndarray, np.ndarray]:
    """onnxshap's (values, expected_value) on the logits of a zoo export (cached per session)."""
    x, bg = zoo.data(name)
    ex = onnxshap.DeepExplainer(zoo.cached_onnx(name, dynamo=EXPORTERS[exporter]), bg)
    return np.asarray(ex.shap_values(x)), np.asarray(ex.expected_value)


@functools.cache
def shap_reference(name: str) -> tuple[np.ndarray, np.ndarray]:
    """shap 0.51's DeepExplainer on a float64 copy of the torch model: (values, expected_value)."""
    shap = pytest.importorskip("shap")
    x, bg = zoo.data(name)
    model = torch64(name)
    ex = shap.DeepExplainer(model, t64(bg))
    values = np.asarray(ex.shap_values(t64(x), check_additivity=False))
    err = torch_additivity(model, x, bg, values)
    print(f"shap reference additivity error on {name}: {err:.2e}")
    assert err <= REF_ADD_TOL, f"shap is not a valid reference on {name}: additivity error {err:.2e}"
    return values, np.asarray(ex.expected_value)


def captum_deepliftshap(model: torch.nn.Module, x: np.ndarray, bg: np.ndarray, k: int) -> np.ndarray:
    """``DeepLiftShap(model).attribute(x, baselines=bg, target=j)`` stacked over ``j`` → (n, ..., k)."""
    captum_attr = pytest.importorskip("captum.attr")
    dls = captum_attr.DeepLiftShap(model)
    return np.stack(
        [dls.attribute(t64(x), baselines=t64(bg), target=j).detach().numpy() for j in range(k)], axis=-1
    )


CAPTUM_ROWS = {"mnist_cnn": 2}  # Captum in float64 on mnist_cnn costs ~1.6 s CPU per row; others: all rows


@functools.cache
def captum_reference(name: str) -> np.ndarray:
    """Captum 0.9's DeepLiftShap on a float64 copy of the torch model, all outputs: (rows, ..., k).

    ``mnist_cnn`` runs as ``mnist_cnn(captum_safe=True)`` (same function and weights; see
    :func:`test_matches_captum_deepliftshap`) and on its first ``CAPTUM_ROWS`` rows only, to keep the
    suite fast: 2 rows × 20 references still route every MaxPool window of 40 pairs through the rule. The
    plain model's additivity error is printed for the record (one row, float32: it is far above rounding).
    """
    x, bg = zoo.data(name)
    x = x[: CAPTUM_ROWS.get(name, len(x))]
    kwargs = {"captum_safe": True} if name == "mnist_cnn" else {}
    model = torch64(name, **kwargs)
    with torch.no_grad():
        k = model(t64(x[:1])).shape[1]
    if kwargs:
        plain = zoo.BUILDERS[name]()
        with torch.no_grad():
            np.testing.assert_array_equal(model(t64(x)).numpy(), plain.double()(t64(x)).numpy())
        plain = plain.float()
        dls = pytest.importorskip("captum.attr").DeepLiftShap(plain)
        x32, bg32 = torch.from_numpy(x[:1]), torch.from_numpy(bg)
        phi = np.stack([dls.attribute(x32, baselines=bg32, target=j).detach().numpy() for j in range(k)], -1)
        with torch.no_grad():
            broken = additivity_errors(phi, plain(x32).numpy(), plain(bg32).numpy().mean(0)).max()
        print(f"Captum additivity error on plain {name} (ReLU→MaxPool hook chaining, 1 row): {broken:.2e}")
    values = captum_deepliftshap(model, x, bg, k)
    err = torch_additivity(model, x, bg, values)
    print(f"Captum reference additivity error on {name}{'(captum_safe)' if kwargs else ''}: {err:.2e}")
    assert err <= REF_ADD_TOL, f"Captum is not a valid reference on {name}: additivity error {err:.2e}"
    return values


# --------------------------------------------------------------------------------------------------
# 1. agreement with shap and Captum on the logits
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name,exporter", MODEL_EXPORTER, ids=[f"{n}-{e}" for n, e in MODEL_EXPORTER])
def test_matches_shap_deep_explainer(name, exporter):
    """onnxshap on the ONNX export == ``shap.DeepExplainer(torch_model, bg).shap_values(X)`` (≤ REL).

    shap applies the DeepLIFT rules onnxshap uses on every module of these models (module docstring):
    rescale on ReLU/Tanh/LeakyReLU, cross-max on MaxPool2d, the exact gradient on Linear/Conv (including
    the depthwise one)/BatchNorm (eval)/AvgPool/Flatten and on the functional residual add. Its validity is
    checked, not assumed: the float64 reference must be additive to ``REF_ADD_TOL``. Both exporters are
    covered (the TorchScript one folds BatchNorm into the convs and emits Flatten; the dynamo one emits
    Reshape), so the same function reaches onnxshap as two different graphs.
    """
    pytest.importorskip("shap")
    values, expected = onnxshap_values(name, exporter)
    ref_values, ref_expected = shap_reference(name)
    x, _ = zoo.data(name)
    assert values.shape == (x.shape[0], *x.shape[1:], ref_values.shape[-1])
    assert values.dtype == np.float32 or values.dtype == np.float64
    # E f(R): ORT float32 forward vs torch float64 forward, so float32 forward-pass rounding only
    zoo.assert_close_scaled(expected, ref_expected, 1e-5, "expected_value vs shap")
    err = rel_err(values, ref_values)
    print(f"{name}-{exporter}: onnxshap vs shap relative error {err:.2e}")
    assert err <= REL, f"onnxshap differs from shap on {name} ({exporter}): {err:.3g} > {REL:g}"


CAPTUM_CASES = [(name, exp) for name in ("mlp", "bn_cnn", "mnist_cnn") for exp in EXPORTERS]


@pytest.mark.parametrize("name,exporter", CAPTUM_CASES, ids=[f"{n}-{e}" for n, e in CAPTUM_CASES])
def test_matches_captum_deepliftshap(name, exporter):
    """onnxshap == Captum's ``DeepLiftShap(model).attribute(X, baselines=bg, target=j)`` for every j (≤ REL).

    Captum is an independent implementation of the rescale rule (LeakyReLU included: it is in Captum's
    ``SUPPORTED_NON_LINEAR`` and gets ``Δy/Δx``, not the gradient); AvgPool, BatchNorm, the depthwise conv
    and the residual add are linear, and Captum gives them the exact autograd gradient. bn_cnn is built so
    that no hooked module's input tensor also feeds another branch (Captum would overwrite the summed
    gradient of such a tensor): the skip connection leaves from a LeakyReLU's *output*.

    ``mnist_cnn``: Captum loses additivity (5.6e-2) on the plain model because ReLU feeds MaxPool2d
    directly and its tensor hooks then see the wrong gradient (module docstring, :class:`zoo.NewTensor`);
    that measured error is printed (:func:`captum_reference`). The comparison runs on
    ``mnist_cnn(captum_safe=True)`` — the same function and weights with ``x * 1.0`` between the two — where
    Captum is additive, so the MaxPool cross-max rule is checked against a second implementation too (on the
    first ``CAPTUM_ROWS`` rows). The reference must be additive to ``REF_ADD_TOL`` in float64 before it is used.
    """
    pytest.importorskip("captum")
    values, _ = onnxshap_values(name, exporter)
    ref = captum_reference(name)
    values = values[: ref.shape[0]]
    err = rel_err(values, ref)
    print(f"{name}-{exporter}: onnxshap vs Captum relative error {err:.2e}")
    assert err <= REL, f"onnxshap differs from Captum on {name} ({exporter}): {err:.3g} > {REL:g}"


# --------------------------------------------------------------------------------------------------
# 2. a trailing Softmax kept
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name,exporter", MODEL_EXPORTER, ids=[f"{n}-{e}" for n, e in MODEL_EXPORTER])
def test_softmax_output_additivity(name, exporter):
    """With the Softmax kept, Σφ == f(x) − E f(R) on every row and output (DESIGN.md §5.1).

    Only additivity is checked: neither reference is valid for Softmax values (shap rescales it
    elementwise, Captum's rule is not additive; module docstring). Measured: onnxshap's decomposition and
    shap's elementwise rescale are both additive yet differ by 1.0–1.5 in ``rel_err`` on these models. ``f`` is
    ONNX Runtime's forward pass of the exported model, and ``E f(R)`` must equal the mean of its outputs on the
    background. The
    Explanation from ``explain`` must carry the same values, and its own per-row additivity report
    must agree with the bound.
    """
    x, bg = zoo.data(name)
    model = zoo.cached_onnx(name, softmax=True, dynamo=EXPORTERS[exporter])
    ex = onnxshap.DeepExplainer(model, bg)
    values = np.asarray(ex.shap_values(x))
    fx = zoo.run_onnx(model, x)
    k = fx.shape[1]
    assert values.shape == (x.shape[0], *x.shape[1:], k)
    zoo.assert_close_scaled(ex.expected_value, zoo.run_onnx(model, bg).mean(0), 1e-5, "expected_value")
    errs = additivity_errors(values, fx, ex.expected_value)
    print(f"{name}-{exporter} softmax: worst additivity error {errs.max():.2e}")
    assert errs.max() <= ADD_TOL, f"additivity violated: worst row/output {errs.max():.3g}"

    exp = ex.explain(x)
    np.testing.assert_allclose(np.asarray(exp.values), values, rtol=0, atol=1e-6 * np.abs(values).max())
    np.testing.assert_array_equal(np.asarray(exp.data), x)
    base = np.broadcast_to(np.asarray(exp.base_values, dtype=np.float64), (x.shape[0], k))
    np.testing.assert_allclose(base, np.broadcast_to(ex.expected_value, (x.shape[0], k)), rtol=1e-6)
    reported = np.asarray(exp.additivity_error, dtype=np.float64)
    assert reported.shape[0] == x.shape[0]
    assert np.all(reported <= ADD_TOL)
    assert len(exp.output_names) == k


# --------------------------------------------------------------------------------------------------
# 3. the Keras twin through tf2onnx
# --------------------------------------------------------------------------------------------------


def test_keras_twin_via_tf2onnx():
    """The keras-3 twin of mnist_cnn (NHWC, same weights) converted by tf2onnx explains like the torch one.

    tf2onnx's graph differs a lot from torch's (a leading Reshape NHWC→NCHW, a Transpose before the
    flatten, the flatten's target shape computed at run time by Shape/Gather/Slice/Concat, MatMul+Add
    instead of Gemm) but computes the same function, so the SHAP values must be the torch export's values
    with the input axes moved (NHWC ↔ NCHW), to REL, and additive to ADD_TOL.
    """
    pytest.importorskip("tensorflow")
    pytest.importorskip("tf2onnx")
    pytest.importorskip("keras")
    x, bg = zoo.data("mnist_cnn")
    x_nhwc, bg_nhwc = x.transpose(0, 2, 3, 1), bg.transpose(0, 2, 3, 1)
    model = zoo.cached_keras_twin_onnx()  # verified against keras and torch when built
    ex = onnxshap.DeepExplainer(model, np.ascontiguousarray(bg_nhwc))
    values = np.asarray(ex.shap_values(np.ascontiguousarray(x_nhwc)))
    assert values.shape == (5, 28, 28, 1, 10)
    errs = additivity_errors(values, zoo.run_onnx(model, x_nhwc), ex.expected_value)
    print(f"keras twin: worst additivity error {errs.max():.2e}")
    assert errs.max() <= ADD_TOL

    torch_values, torch_expected = onnxshap_values("mnist_cnn", "torchscript")
    zoo.assert_close_scaled(ex.expected_value, torch_expected, 1e-5, "expected_value keras vs torch")
    err = rel_err(values.transpose(0, 3, 1, 2, 4), torch_values)
    print(f"keras twin vs torch twin: relative error {err:.2e}")
    assert err <= REL


# --------------------------------------------------------------------------------------------------
# 4. invariants
# --------------------------------------------------------------------------------------------------


def test_background_order_does_not_matter():
    """Permuting the background rows changes only the order of the mean over references.

    Tolerance ORDER_TOL (1e-5): a float32 mean of m = 20 terms in another order differs by at most a
    few m·eps ≈ 2.4e-6 of the largest term.
    """
    x, bg = zoo.data("bn_cnn")
    model = zoo.cached_onnx("bn_cnn")
    perm = np.random.default_rng(1).permutation(bg.shape[0])
    a = onnxshap.DeepExplainer(model, bg)
    b = onnxshap.DeepExplainer(model, bg[perm])
    zoo.assert_close_scaled(b.expected_value, a.expected_value, ORDER_TOL, "expected_value")
    assert rel_err(b.shap_values(x), a.shap_values(x)) <= ORDER_TOL


def test_copies_of_one_reference_equal_that_reference():
    """m copies of one reference give the single-reference explanation (a mean of equal terms)."""
    x, bg = zoo.data("bn_cnn")
    model = zoo.cached_onnx("bn_cnn")
    one = bg[:1]
    single = onnxshap.DeepExplainer(model, one)
    copies = onnxshap.DeepExplainer(model, np.repeat(one, 7, axis=0))
    zoo.assert_close_scaled(copies.expected_value, single.expected_value, ORDER_TOL, "expected_value")
    v_single = np.asarray(single.shap_values(x))
    assert rel_err(copies.shap_values(x), v_single) <= ORDER_TOL
    # and a single reference is plain DeepLIFT: additive against that one reference
    fx = zoo.run_onnx(model, x)
    assert additivity_errors(v_single, fx, zoo.run_onnx(model, one)[0]).max() <= ADD_TOL


def test_linear_model_exact():
    """``nn.Linear(7, 3)`` exported: φ[i, f, j] = (x[i, f] − mean_r r[f]) · W[j, f] exactly.

    Computed in float64 numpy; onnxshap works in float32, so the tolerance is float32 rounding of a
    handful of operations: rtol 1e-5 with an absolute floor of 1e-6 of the largest value.
    """
    x, bg = zoo.data("linear")
    module = zoo.linear()
    w = module.weight.detach().numpy().astype(np.float64)  # (3, 7)
    b = module.bias.detach().numpy().astype(np.float64)
    ex = onnxshap.DeepExplainer(zoo.cached_linear_onnx(), bg)
    values = np.asarray(ex.shap_values(x))
    expected_phi = (x.astype(np.float64) - bg.astype(np.float64).mean(0))[:, :, None] * w.T[None]
    assert values.shape == (5, 7, 3)
    np.testing.assert_allclose(values, expected_phi, rtol=1e-5, atol=1e-6 * np.abs(expected_phi).max())
    np.testing.assert_allclose(
        ex.expected_value, (bg.astype(np.float64) @ w.T + b).mean(0), rtol=1e-5, atol=1e-6
    )


def test_deterministic():
    """Same inputs, same outputs (DESIGN.md §5.6): two calls and two explainers agree bit for bit."""
    x, bg = zoo.data("mlp")
    model = zoo.cached_onnx("mlp")
    ex = onnxshap.DeepExplainer(model, bg)
    first = np.asarray(ex.shap_values(x))
    np.testing.assert_array_equal(np.asarray(ex.shap_values(x)), first)
    np.testing.assert_array_equal(np.asarray(onnxshap.DeepExplainer(model, bg).shap_values(x)), first)


# --------------------------------------------------------------------------------------------------
# 5. ranked_outputs
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("order", ["max", "min", "max_abs"])
def test_ranked_outputs_match_shap(order):
    """``ranked_outputs=j`` returns ``(values (n, *x.shape[1:], j), indices (n, j))`` as shap does.

    shap's convention (deep_pytorch.py): per row, sort the model outputs descending for "max",
    *ascending* for "min", descending by absolute value for "max_abs"; keep the first j. The indices must
    equal shap's and that rule applied to ONNX Runtime's f(x); the values must be the full explanation's
    columns in that order and agree with shap's ranked values to REL. The data is checked to have no
    near-ties in the ranking (a gap under 1e-4 could flip between float32 and float64).
    """
    shap = pytest.importorskip("shap")
    x, bg = zoo.data("mlp")
    model = zoo.cached_onnx("mlp")
    fx = zoo.run_onnx(model, x).astype(np.float64)
    key = {"max": -fx, "min": fx, "max_abs": -np.abs(fx)}[order]
    gaps = np.diff(np.sort(key, axis=1), axis=1)
    assert gaps.min() > 1e-4, "test data has a near-tie in the output ranking"
    want_idx = np.argsort(key, axis=1, kind="stable")

    ex = onnxshap.DeepExplainer(model, bg)
    full = np.asarray(ex.shap_values(x))
    ref_ex = shap.DeepExplainer(torch64("mlp"), t64(bg))
    for j in (1, 2, 3):
        values, idx = ex.shap_values(x, ranked_outputs=j, output_rank_order=order)
        values, idx = np.asarray(values), np.asarray(idx)
        assert values.shape == (5, 20, j) and idx.shape == (5, j)
        np.testing.assert_array_equal(idx, want_idx[:, :j])
        ref_values, ref_idx = ref_ex.shap_values(
            t64(x), ranked_outputs=j, output_rank_order=order, check_additivity=False
        )
        np.testing.assert_array_equal(idx, np.asarray(ref_idx))
        assert rel_err(values, np.asarray(ref_values)) <= REL
        picked = np.stack([full[i][..., idx[i]] for i in range(x.shape[0])])
        np.testing.assert_allclose(values, picked, rtol=0, atol=1e-6 * np.abs(full).max())


def test_ranked_outputs_bad_order():
    """An unknown ``output_rank_order`` is refused (shap raises ValueError; an OnnxShapError also counts)."""
    x, bg = zoo.data("mlp")
    ex = onnxshap.DeepExplainer(zoo.cached_onnx("mlp"), bg)
    with pytest.raises((ValueError, onnxshap.errors.OnnxShapError)):
        ex.shap_values(x, ranked_outputs=2, output_rank_order="median")


# --------------------------------------------------------------------------------------------------
# 6. the augmented graph
# --------------------------------------------------------------------------------------------------


def _feeds(sess, x: np.ndarray, bg: np.ndarray, k: int, original_inputs: set[str]) -> dict[str, np.ndarray]:
    """Inputs for the saved augmented graph (``save_augmented``'s contract: the model's own inputs, the
    background rows as ``reference/<input>``, and an int64 ``output_index`` (n, k) choosing the outputs to
    explain per row)."""
    feeds = {}
    for inp in sess.get_inputs():
        if inp.name in original_inputs:
            feeds[inp.name] = x
        elif inp.name.startswith("reference/") and inp.name.removeprefix("reference/") in original_inputs:
            feeds[inp.name] = bg
        elif inp.type == "tensor(int64)" and len(inp.shape) == 2:
            feeds[inp.name] = np.tile(np.arange(k, dtype=np.int64), (x.shape[0], 1))
        else:
            raise AssertionError(f"augmented graph input {inp.name} {inp.shape} {inp.type}: cannot feed it")
    return feeds


@pytest.mark.parametrize("name", ["mlp", "mnist_cnn", "bn_cnn"])
def test_saved_augmented_graph(tmp_path, name):
    """``save_augmented`` writes a model that passes ``check_model(full_check=True)``, has an IR version
    the installed ONNX Runtime accepts, and runs on stock ONNX Runtime CPU (a plain session, no onnxshap
    code involved); fed X and all k output indices, it returns the explainer's SHAP values (one output of
    shape (n, *x.shape[1:], k)) and, where it has a ``prediction`` output, f(x)."""
    x, bg = zoo.data(name)
    model = zoo.cached_onnx(name, dynamo=True)
    ex = onnxshap.DeepExplainer(model, bg)
    values = np.asarray(ex.shap_values(x))
    k = values.shape[-1]
    path = tmp_path / f"{name}.deepshap.onnx"
    ex.save_augmented(str(path))
    saved = onnx.load(str(path))
    onnx.checker.check_model(saved, full_check=True)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    outputs = dict(zip(names, sess.run(None, _feeds(sess, x, bg, k, {i.name for i in model.graph.input}))))
    for out_name, out in outputs.items():
        if np.issubdtype(out.dtype, np.floating):
            assert np.all(np.isfinite(out)), f"non-finite values in output {out_name}"
    matching = [o for o in outputs.values() if o.shape == values.shape]
    assert len(matching) == 1, (
        f"expected one output shaped {values.shape}: {[(n, o.shape) for n, o in outputs.items()]}"
    )
    # same graph, same inputs: differences only from how the explainer chunks rows
    assert rel_err(matching[0], values) <= 1e-6
    if "prediction" in outputs:
        zoo.assert_close_scaled(outputs["prediction"], zoo.run_onnx(model, x), 1e-5, "prediction")
