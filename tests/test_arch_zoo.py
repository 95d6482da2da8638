"""The model zoo of issue 9 (item 7): the architectures people ship, through every export path.

This file is the acceptance bar of issue 9. Models (``arch_zoo``, ``keras_zoo``) are random-initialised with
outputs that vary (re-estimated BatchNorm statistics, non-zero heads; checked by the ``subject`` fixture),
small inputs, and exported through both torch exporters (TorchScript at opset 17, dynamo at its native opset
18) or tf2onnx; exports are cached in pytest's cache folder (``.pytest_cache/d/onnxshap-arch-zoo``).

1. ``test_explained_exactly``: ``onnxshap.DeepExplainer(model_proto, background)`` explains every row of every
   model × export path: no refusal, no crash, finite values, and additivity (DESIGN.md §5.1:
   ``|Σφ − (f(x) − E f(R))| ≤ 1e-4 · max(1, |f(x) − E f(R)|)``) on every row and output, with ``f`` evaluated by
   ONNX Runtime on the *original* export. Token ``input_ids`` exports are passed as they are: finding the
   embedding is onnxshap's job (issue 9 item 4).
2. ``test_agrees_with_shap``: where shap's PyTorch DeepExplainer is exact on the same module (its float64
   additivity is checked first, ≤ 1e-9), onnxshap's values equal shap's within 1e-4 (per-output scaled).
   shap 0.51 was surveyed on every float-input zoo module (float64, additivity error): exact (≤ 1.3e-16) on
   ``gap_head``, ``depthwise_separable``, ``channels_last_mean``, ``channels_last_gather``, ``last_token``;
   it crashes on every module with an in-place op (``RuntimeError: Output 0 of BackwardHookFunction is a view
   and is being modified inplace``: all ResNet, MobileNet, DenseNet and EfficientNet blocks); it is not
   additive on attention (0.05–0.5: it hooks modules, so functional softmax, matmul and LayerNorm get plain
   gradients). Only the exact ones are references.
3. ``test_torch_module_directly``: ``DeepExplainer(torch_module, background_tensors)`` works on every torch
   model (additivity against the module's own outputs).
4. ``test_token_attributions_ids_equal_embeds``: per-token attributions of the ``input_ids`` export (explained
   at the word-embedding ``Gather`` output with ``layer=``, summed over the embedding axis) equal those of the
   ``inputs_embeds`` export of the same weights (≤ 1e-4, per-output scaled).
5. ``test_rows_independent``: replacing one explained row changes no other row's values (≤ 1e-5 of the values'
   magnitude) — the batch stays a batch, also where the export merges it with heads, tokens or windows.

Failures are reported as one precise line: model, export path, and onnxshap's exception (its class and
message; for a crash, the innermost onnxshap frame).
"""

from __future__ import annotations

import copy
import traceback
from dataclasses import dataclass
from pathlib import Path

import arch_zoo as az
import keras_zoo as kz
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import shap
import torch

import onnxshap
from onnxshap.errors import OnnxShapError

ADDITIVITY = 1e-4  # DESIGN.md §5.1, relative to max(1, |Δf|)
REL = 1e-4  # values against a reference, per-output scaled (test_reference_agreement.rel_err)
SHAP_REFERENCE_ADDITIVITY = 1e-9  # a float64 reference whose rules are all exact adds up to ~1e-16
ROW_TOLERANCE = 1e-5  # another row's change may move a row's values by float32 rounding at most

TORCH_SUBJECTS = [(name, exporter) for name in az.CASES for exporter in az.EXPORTERS]
KERAS_SUBJECTS = [(name, "tf2onnx") for name in kz.BUILDERS]
SUBJECTS = TORCH_SUBJECTS + KERAS_SUBJECTS
SHAP_EXACT = ("gap_head", "depthwise_separable", "channels_last_mean", "channels_last_gather", "last_token")


def _id(pair) -> str:
    return f"{pair[0]}-{pair[1]}"


# --------------------------------------------------------------------------------------------------
# subjects: one model × export path, with its data
# --------------------------------------------------------------------------------------------------


@dataclass
class Subject:
    """A model × export path: the export, the explained rows, the background, and ``f`` by ONNX Runtime."""

    name: str
    path: str
    proto: onnx.ModelProto
    x: list[np.ndarray]
    background: list[np.ndarray]

    @property
    def label(self) -> str:
        return f"{self.name} [{self.path}]"

    def feeds(self, arrays: list[np.ndarray]) -> dict[str, np.ndarray]:
        initializers = {i.name for i in self.proto.graph.initializer}
        names = [i.name for i in self.proto.graph.input if i.name not in initializers]
        return dict(zip(names, arrays))

    def f(self, arrays: list[np.ndarray]) -> np.ndarray:
        """The original export's outputs on ``arrays``, flattened to ``(rows, k)`` float64."""
        return ort_outputs(self.proto, self.feeds(arrays))


def ort_outputs(proto: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> np.ndarray:
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    outputs = session.run(None, feeds)
    return np.concatenate([o.reshape(len(o), -1) for o in outputs], axis=1).astype(np.float64)


_SUBJECTS: dict[tuple[str, str], Subject] = {}


def load_subject(name: str, path: str, folder: Path) -> Subject:
    """Export (cached) and draw data; assert the export's outputs vary across rows."""
    key = (name, path)
    if key not in _SUBJECTS:
        if path == "tf2onnx":
            proto = attempt(kz.export, name, folder)
            x, background = kz.data(name)
            x, background = [x], [background]
        else:
            proto = attempt(az.export, az.CASES[name], path, folder)
            x, background = az.data(az.CASES[name])
        if isinstance(proto, Exception):
            pytest.fail(f"{name} [{path}]: the export failed (before onnxshap ran): {describe(proto)}",
                        pytrace=False)
        subject = Subject(name, path, proto, x, background)
        az.assert_outputs_vary(subject.f([np.concatenate(p) for p in zip(x, background)]), subject.label)
        _SUBJECTS[key] = subject
    return _SUBJECTS[key]


@pytest.fixture(params=SUBJECTS, ids=[_id(s) for s in SUBJECTS])
def subject(request, zoo_cache) -> Subject:
    return load_subject(*request.param, zoo_cache)


# --------------------------------------------------------------------------------------------------
# running onnxshap, with failures stated in one line
# --------------------------------------------------------------------------------------------------


def describe(exc: BaseException) -> str:
    """onnxshap's own errors: class and message; anything else is a crash: class, first line, and where."""
    text = str(exc).strip()
    if isinstance(exc, az.CachedExportFailure):
        return f"{text} (cached from an earlier run)"
    if isinstance(exc, OnnxShapError):
        return f"{type(exc).__name__}: {text}"
    first = text.splitlines()[0] if text else ""
    frames = [f for f in traceback.extract_tb(exc.__traceback__)
              if "/onnxshap/" in f.filename or "/converters/" in f.filename]
    where = ""
    if frames:
        frame = frames[-1]
        where = f" (crash in {'/'.join(Path(frame.filename).parts[-2:])}:{frame.lineno} {frame.name})"
    return f"{type(exc).__name__}: {first}{where}"


_EXPLANATIONS: dict[tuple, object] = {}


def explain(subject: Subject, x: list[np.ndarray] | None = None, layer: str | None = None,
            check_additivity: bool = True) -> list[np.ndarray]:
    """onnxshap's values ``(n, *features, k)`` per explained tensor for ``x`` (default: the subject's rows);
    the explainer is built once per (subject, layer). Fails the test with a one-line description."""
    key = (subject.name, subject.path, layer)
    if key not in _EXPLANATIONS:
        _EXPLANATIONS[key] = attempt(onnxshap.DeepExplainer, subject.proto, _one_or_list(subject.background),
                                     layer=layer)
    explainer = _EXPLANATIONS[key]
    where = f" with layer={layer!r}" if layer else ""
    if isinstance(explainer, Exception):
        pytest.fail(f"{subject.label}: DeepExplainer{where} failed: {describe(explainer)}", pytrace=False)
    result = attempt(explainer.explain, _one_or_list(subject.x if x is None else x),
                     check_additivity=check_additivity)
    if isinstance(result, Exception):
        pytest.fail(f"{subject.label}: explain(X){where} failed: {describe(result)}", pytrace=False)
    return [e.values for e in (result if isinstance(result, list) else [result])]


def attempt(function, *args, **kwargs):
    """``function(*args, **kwargs)``, or the exception it raised (so the test fails outside the handler)."""
    try:
        return function(*args, **kwargs)
    except Exception as exc:  # noqa: BLE001 - every failure is the finding
        return exc


def _one_or_list(arrays: list[np.ndarray]):
    return arrays[0] if len(arrays) == 1 else list(arrays)


def assert_additive(values: list[np.ndarray], fx: np.ndarray, fb: np.ndarray, label: str) -> None:
    """DESIGN.md §5.1 on every row and output; ``fx`` (n, k) at the rows, ``fb`` (m, k) at the background."""
    for v in values:
        assert np.isfinite(v).all(), f"{label}: SHAP values contain NaN/Inf"
    n, k = fx.shape
    assert all(v.shape[0] == n and v.shape[-1] == k for v in values), (
        f"{label}: values of shapes {[v.shape for v in values]} for {n} rows and {k} outputs")
    total = sum(v.reshape(n, -1, k).astype(np.float64).sum(1) for v in values)
    change = fx - fb.mean(0)
    error = np.abs(total - change) / np.maximum(1.0, np.abs(change))
    row, out = np.unravel_index(int(error.argmax()), error.shape)
    assert error.max() <= ADDITIVITY, (
        f"{label}: additivity error {error[row, out]:.3g} > {ADDITIVITY:g} at row {row}, output {out} "
        f"(Σφ = {total[row, out]:.6g}, f(x) − E f = {change[row, out]:.6g})")


def rel_err(actual: np.ndarray, desired: np.ndarray) -> float:
    """``max_j max|a[..., j] − b[..., j]| / max(max|b[..., j]|, 1e-6)`` over outputs ``j`` (the last axis)."""
    a = np.asarray(actual, dtype=np.float64)
    b = np.asarray(desired, dtype=np.float64)
    assert a.shape == b.shape, f"shape {a.shape} != reference shape {b.shape}"
    a, b = a.reshape(-1, b.shape[-1]), b.reshape(-1, b.shape[-1])
    return float(np.max(np.abs(a - b).max(0) / np.maximum(np.abs(b).max(0), 1e-6)))


# --------------------------------------------------------------------------------------------------
# 1. every model × export path is explained exactly
# --------------------------------------------------------------------------------------------------


def test_explained_exactly(subject):
    values = explain(subject)
    assert_additive(values, subject.f(subject.x), subject.f(subject.background), subject.label)


# --------------------------------------------------------------------------------------------------
# 2. agreement with shap where shap is exact
# --------------------------------------------------------------------------------------------------


def shap_reference(name: str) -> np.ndarray:
    """shap's values ``(n, *features, k)`` on a float64 copy of the module, after checking it adds up."""
    case = az.CASES[name]
    net = copy.deepcopy(az.module(name)).double().eval()
    x, background = az.data(case)
    xt = [torch.from_numpy(a.astype(np.float64)) for a in x]
    bt = [torch.from_numpy(a.astype(np.float64)) for a in background]
    explainer = shap.DeepExplainer(net, _one_or_list(bt))
    values = np.asarray(explainer.shap_values(_one_or_list(xt), check_additivity=False))
    with torch.no_grad():
        fx, fb = net(*xt).numpy(), net(*bt).numpy()
    total = values.reshape(len(fx), -1, fx.shape[1]).sum(1)
    change = fx - fb.mean(0)
    error = float((np.abs(total - change) / np.maximum(1.0, np.abs(change))).max())
    assert error <= SHAP_REFERENCE_ADDITIVITY, f"shap is not exact on {name}: additivity error {error:.3g}"
    return values


SHAP_SUBJECTS = [(name, exporter) for name in SHAP_EXACT for exporter in az.EXPORTERS]


@pytest.mark.parametrize("name,exporter", SHAP_SUBJECTS, ids=[_id(s) for s in SHAP_SUBJECTS])
def test_agrees_with_shap(name, exporter, zoo_cache):
    subject = load_subject(name, exporter, zoo_cache)
    reference = shap_reference(name)
    (values,) = explain(subject)
    error = rel_err(values, reference)
    assert error <= REL, f"{subject.label}: values differ from shap.DeepExplainer's by {error:.3g} > {REL:g}"


# --------------------------------------------------------------------------------------------------
# 3. a torch module passed directly
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(az.CASES))
def test_torch_module_directly(name):
    case = az.CASES[name]
    net = az.module(name)
    x, background = az.data(case)
    tensors = [torch.from_numpy(a) for a in background]
    label = f"{name} [torch module]"
    explainer = attempt(onnxshap.DeepExplainer, net, _one_or_list(tensors))
    if isinstance(explainer, Exception):
        pytest.fail(f"{label}: DeepExplainer failed: {describe(explainer)}", pytrace=False)
    result = attempt(explainer.explain, _one_or_list([torch.from_numpy(a) for a in x]))
    if isinstance(result, Exception):
        pytest.fail(f"{label}: explain(X) failed: {describe(result)}", pytrace=False)
    values = [e.values for e in (result if isinstance(result, list) else [result])]
    assert_additive(values, az.torch_outputs(net, x), az.torch_outputs(net, background), label)


# --------------------------------------------------------------------------------------------------
# 4. token models: input_ids (at the embedding) == inputs_embeds
# --------------------------------------------------------------------------------------------------


RESHAPES = ("Reshape", "Cast", "Identity", "Unsqueeze", "Squeeze", "Flatten")


def word_embedding_output(proto: onnx.ModelProto) -> str:
    """The output of the ``Gather`` that looks ``input_ids`` (possibly reshaped or cast first, as GPT-2's
    ``input_ids.view(-1, L)``) up in the (VOCAB, D) table."""
    tables = {i.name for i in proto.graph.initializer if tuple(i.dims) == (az.VOCAB, az.D)}
    tables |= {n.output[0] for n in proto.graph.node if n.op_type == "Constant"
               and tuple(n.attribute[0].t.dims) == (az.VOCAB, az.D)}
    ids = {"input_ids"}
    for node in proto.graph.node:  # topological order
        if node.op_type in RESHAPES and node.input[0] in ids:
            ids.add(node.output[0])
    found = [n.output[0] for n in proto.graph.node
             if n.op_type == "Gather" and n.input[0] in tables and n.input[1] in ids]
    gathers = [(n.name, list(n.input)) for n in proto.graph.node if n.op_type == "Gather"]
    assert len(found) == 1, f"no unique word-embedding Gather of input_ids: {found}; Gathers: {gathers}"
    return found[0]


TOKEN_SUBJECTS = [(base, exporter) for base in az.TOKEN_BASES for exporter in az.EXPORTERS]


@pytest.mark.parametrize("base,exporter", TOKEN_SUBJECTS, ids=[_id(s) for s in TOKEN_SUBJECTS])
def test_token_attributions_ids_equal_embeds(base, exporter, zoo_cache):
    ids = load_subject(f"{base}_ids", exporter, zoo_cache)
    embeds = load_subject(f"{base}_embeds", exporter, zoo_cache)
    layer = word_embedding_output(ids.proto)
    (from_ids,) = explain(ids, layer=layer)
    (from_embeds,) = explain(embeds)
    assert from_ids.shape == from_embeds.shape, (
        f"{ids.label}: values at {layer!r} have shape {from_ids.shape}, the inputs_embeds export's "
        f"{from_embeds.shape}")
    assert_additive([from_ids], ids.f(ids.x), ids.f(ids.background), f"{ids.label} at {layer!r}")
    per_token_ids, per_token_embeds = from_ids.sum(axis=2), from_embeds.sum(axis=2)  # (n, L, k)
    error = rel_err(per_token_ids, per_token_embeds)
    assert error <= REL, (
        f"{base} [{exporter}]: per-token attributions from input_ids (at {layer!r}) differ from the "
        f"inputs_embeds export's by {error:.3g} > {REL:g}")


# --------------------------------------------------------------------------------------------------
# 5. rows are independent
# --------------------------------------------------------------------------------------------------


def _replace_first_row(subject: Subject) -> list[np.ndarray]:
    """The subject's rows with row 0 replaced by a fresh draw (every input)."""
    if subject.path == "tf2onnx":
        fresh = [kz.draw(subject.name, 1, kz.SEED + 9)]
    else:
        fresh = az.draw(az.CASES[subject.name], 1, az.SEED + 9)
    return [np.concatenate([f, a[1:]]) for f, a in zip(fresh, subject.x)]


def test_rows_independent(subject):
    before = explain(subject, check_additivity=False)  # additivity is test_explained_exactly's business
    perturbed = _replace_first_row(subject)
    assert not all(np.array_equal(p[:1], a[:1]) for p, a in zip(perturbed, subject.x))
    after = explain(subject, perturbed, check_additivity=False)
    for i, (b, a) in enumerate(zip(before, after)):
        assert np.isfinite(b).all() and np.isfinite(a).all(), (
            f"{subject.label}: SHAP values contain NaN/Inf (explained tensor {i}); row independence is moot")
        scale = max(float(np.abs(b[1:]).max()), 1e-12)
        moved = float(np.abs(a[1:] - b[1:]).max()) / scale
        assert moved <= ROW_TOLERANCE, (
            f"{subject.label}: changing row 0 moved the values of rows 1..{len(b) - 1} (explained tensor {i}) "
            f"by {moved:.3g} of their magnitude > {ROW_TOLERANCE:g}: rows are mixed")
