"""The user cache (onnxshap/cache.py): a cached graph gives exactly the values of a built one, for any background
values; a different model, option or code is a different entry; damaged entries are ignored; it can be turned
off; a Keras model of Keras layers is exported once."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import numpy as np
import onnx
import pytest

import onnxshap
from onnxshap import cache
from onnxshap.augment.build import build_augmented

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "models" / "stacked_lstm.onnx"
DATA = np.load(ROOT / "models" / "stacked_lstm_data.npy")
X, BACKGROUND = DATA[:4], DATA[100:130]


@pytest.fixture
def folder(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("ONNXSHAP_CACHE", "1")
    monkeypatch.setenv("ONNXSHAP_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _entries(folder: Path, kind: str = "augmented") -> list[Path]:
    return sorted(folder.glob(f"{kind}-*{cache.SUFFIX}"))


def test_a_cached_graph_gives_exactly_the_values_of_a_built_one(folder):
    reference = onnxshap.DeepExplainer(MODEL, BACKGROUND, cache=False).shap_values(X)
    assert not folder.exists()  # cache=False writes nothing
    built = onnxshap.DeepExplainer(MODEL, BACKGROUND).shap_values(X)
    assert len(_entries(folder)) == 1
    explainer = onnxshap.DeepExplainer(MODEL, BACKGROUND)
    cached = explainer.shap_values(X)
    assert isinstance(explainer.augmented, cache.CachedAugmentedModel)
    np.testing.assert_array_equal(built, reference)
    np.testing.assert_array_equal(cached, reference)
    # the graph parsed from the entry is the one built, and it saves like one
    rebuilt = build_augmented(explainer.plan).model
    assert [n.op_type for n in explainer.augmented.model.graph] == [n.op_type for n in rebuilt.graph]
    assert len(_entries(folder)) == 1


def test_the_background_values_are_not_part_of_the_key(folder):
    onnxshap.DeepExplainer(MODEL, BACKGROUND).shap_values(X)
    other = DATA[150:190]  # other rows, another count: fed at run time
    explainer = onnxshap.DeepExplainer(MODEL, other)
    values = explainer.shap_values(X)  # the additivity check runs against this background
    assert isinstance(explainer.augmented, cache.CachedAugmentedModel)
    np.testing.assert_array_equal(values, onnxshap.DeepExplainer(MODEL, other, cache=False).shap_values(X))
    assert len(_entries(folder)) == 1


def _changed_model() -> onnx.ModelProto:
    """The model with one weight scaled by 1.5."""
    proto = onnx.load(MODEL)
    weight = next(t for t in proto.graph.initializer if onnx.numpy_helper.to_array(t).dtype == np.float32)
    changed = onnx.numpy_helper.to_array(weight) * np.float32(1.5)
    weight.CopyFrom(onnx.numpy_helper.from_array(changed, weight.name))
    return proto


def test_another_model_or_code_is_another_entry(folder, monkeypatch):
    plans = []
    for model in (MODEL, _changed_model()):
        explainer = onnxshap.DeepExplainer(model, BACKGROUND)
        values = explainer.shap_values(X)  # each passes its own additivity check
        assert not isinstance(explainer.augmented, cache.CachedAugmentedModel)
        plans.append(explainer.plan)
    assert len(_entries(folder)) == 2
    assert not np.array_equal(values, onnxshap.DeepExplainer(MODEL, BACKGROUND).shap_values(X))
    key = cache.augmented_key(plans[0])
    assert cache.augmented_key(dataclasses.replace(plans[0], explained=["/lstm1/Transpose_output_0"])) != key
    assert cache.augmented_key(dataclasses.replace(plans[0], outputs=[])) != key
    monkeypatch.setattr(cache, "code_digest", lambda: "another version of onnxshap")
    assert cache.augmented_key(plans[0]) != key


@pytest.mark.parametrize("damage", ["truncate", "flip", "garbage", "empty"])
def test_damaged_entries_are_ignored_and_replaced(folder, damage):
    reference = onnxshap.DeepExplainer(MODEL, BACKGROUND).shap_values(X)
    (entry,) = _entries(folder)
    payload = entry.read_bytes()
    broken = {"truncate": payload[: len(payload) // 2], "empty": b"", "garbage": os.urandom(len(payload)),
              "flip": payload[:-100] + bytes([payload[-100] ^ 0xFF]) + payload[-99:]}[damage]
    entry.write_bytes(broken)
    explainer = onnxshap.DeepExplainer(MODEL, BACKGROUND)
    np.testing.assert_array_equal(explainer.shap_values(X), reference)
    assert not isinstance(explainer.augmented, cache.CachedAugmentedModel)  # built again
    again = onnxshap.DeepExplainer(MODEL, BACKGROUND)  # and written again
    np.testing.assert_array_equal(again.shap_values(X), reference)
    assert isinstance(again.augmented, cache.CachedAugmentedModel) and _entries(folder) == [entry]


def test_off_by_the_environment(folder, monkeypatch):
    monkeypatch.setenv("ONNXSHAP_CACHE", "0")
    onnxshap.DeepExplainer(MODEL, BACKGROUND).shap_values(X)
    assert not folder.exists()


def test_least_recently_used_entries_go_when_the_folder_is_full(folder, monkeypatch):
    onnxshap.DeepExplainer(MODEL, BACKGROUND).shap_values(X)
    (first,) = _entries(folder)
    os.utime(first, (1, 1))  # long unused
    monkeypatch.setenv("ONNXSHAP_CACHE_SIZE", str(first.stat().st_size + 1))
    onnxshap.DeepExplainer(_changed_model(), BACKGROUND).shap_values(X)
    remaining = _entries(folder)
    assert len(remaining) == 1 and remaining[0] != first


def test_the_folder(monkeypatch, tmp_path):
    monkeypatch.delenv("ONNXSHAP_CACHE_DIR", raising=False)
    monkeypatch.setenv("ONNXSHAP_CACHE", "1")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    if os.name == "posix" and not str(cache.folder()).startswith(str(Path.home() / "Library")):
        assert cache.folder() == tmp_path / "onnxshap"
        monkeypatch.setenv("XDG_CACHE_HOME", "relative/path")  # not absolute: ignored, as the spec says
        assert cache.folder() == Path.home() / ".cache" / "onnxshap"
    monkeypatch.setenv("ONNXSHAP_CACHE_DIR", str(tmp_path / "mine"))
    assert cache.folder() == tmp_path / "mine"
    monkeypatch.setenv("ONNXSHAP_CACHE", "off")
    assert cache.folder() is None


def _keras_model(seed: int, custom: bool = False):
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import keras

    class Twice(keras.layers.Layer):
        def call(self, x):
            return 2 * x

    keras.utils.set_random_seed(seed)
    inputs = keras.Input((5,))
    hidden = keras.layers.Dense(4, activation="tanh")(inputs)
    if custom:
        hidden = Twice()(hidden)
    return keras.Model(inputs, keras.layers.Dense(2)(hidden))


def test_a_keras_model_is_exported_once(folder, monkeypatch):
    import onnxshap.explainer as explainer_module

    calls = []
    export = explainer_module.framework_to_onnx
    monkeypatch.setattr(explainer_module, "framework_to_onnx", lambda *a: calls.append(1) or export(*a))
    rng = np.random.default_rng(0)
    x, background = rng.normal(size=(3, 5)).astype(np.float32), rng.normal(size=(20, 5)).astype(np.float32)
    model = _keras_model(0)
    values = onnxshap.DeepExplainer(model, background).shap_values(x)
    again = onnxshap.DeepExplainer(model, background).shap_values(x)
    assert len(calls) == 1 and len(_entries(folder, "export")) == 1
    np.testing.assert_array_equal(values, again)
    other = _keras_model(1)  # other weights: another export
    onnxshap.DeepExplainer(other, background).shap_values(x)
    assert len(calls) == 2 and len(_entries(folder, "export")) == 2
    custom = _keras_model(0, custom=True)  # a layer whose code the key cannot see: exported every time
    assert cache.keras_key(custom, [background]) is None
    for _ in range(2):
        onnxshap.DeepExplainer(custom, background).shap_values(x)
    assert len(calls) == 4 and len(_entries(folder, "export")) == 2
