"""Scale-out: the explainer pickles, runs in spawned processes, on a local Ray cluster and in Dask partitions,
with the values of the single-process run."""

from __future__ import annotations

import multiprocessing
import pickle
import time
from concurrent.futures import ProcessPoolExecutor

import numpy as np
import pandas as pd
import pytest

import onnxshap
from onnxshap.errors import UsageError
from tests.scale_models import mlp


@pytest.fixture(scope="module")
def explainer():
    background = np.random.default_rng(1).normal(size=(16, 8)).astype(np.float32)
    return onnxshap.DeepExplainer(mlp(), background)


@pytest.fixture(scope="module")
def rows():
    return np.random.default_rng(2).normal(size=(300, 8)).astype(np.float32)


def test_unpickled_explainer_gives_identical_values(explainer, rows):
    values = explainer.shap_values(rows)
    payload = pickle.dumps(explainer)
    assert len(payload) < 20_000  # model bytes + background + options: no sessions, no lowered graphs
    clone = pickle.loads(payload)
    assert clone.runner._forward is None and clone.runner._augmented is None  # sessions are made on first use
    np.testing.assert_array_equal(clone.shap_values(rows), values)
    np.testing.assert_array_equal(clone.expected_value, explainer.expected_value)
    assert clone.max_memory == explainer.max_memory and clone.output_labels == explainer.output_labels


def test_an_explainer_with_sessions_and_a_graph_still_pickles(explainer, rows):
    explainer.shap_values(rows[:3])  # sessions and the augmented graph exist now
    assert explainer.runner._augmented is not None
    clone = pickle.loads(pickle.dumps(explainer))
    np.testing.assert_array_equal(clone.shap_values(rows[:3]), explainer.shap_values(rows[:3]))


def test_a_pickle_of_another_format_is_refused_in_one_line(explainer):
    state = explainer.__getstate__()
    state["format"] = -1
    clone = object.__new__(onnxshap.DeepExplainer)
    with pytest.raises(UsageError, match="another version of onnxshap"):
        clone.__setstate__(state)


def _explain(explainer, rows):
    return explainer.shap_values(rows)


def test_spawned_worker_processes_give_the_in_process_values(explainer, rows):
    expected = explainer.shap_values(rows)
    parts = np.array_split(rows, 3)
    with ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("spawn")) as pool:
        results = list(pool.map(_explain, [explainer] * len(parts), parts))
    np.testing.assert_array_equal(np.concatenate(results), expected)


@pytest.fixture(scope="module")
def ray_cluster():
    import ray

    started = time.perf_counter()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False,
             runtime_env={"env_vars": {"ONNXSHAP_THREADS": "1"}})  # one ONNX Runtime thread per actor
    print(f"ray.init: {time.perf_counter() - started:.1f} s")
    yield ray
    ray.shutdown()


def _by_rows(x: np.ndarray) -> np.ndarray:
    """Row order that sorts ``x`` (rows are distinct): Ray Data does not keep the input order."""
    return np.lexsort(x.reshape(len(x), -1).T[::-1])


def test_ray_dataset_of_100000_rows_gives_the_single_process_values(ray_cluster):
    from onnxshap.integrations.ray import explain_dataset

    background = np.random.default_rng(3).normal(size=(20, 8)).astype(np.float32)
    ex = onnxshap.DeepExplainer(mlp(seed=4), background)
    x = np.random.default_rng(5).normal(size=(100_000, 8)).astype(np.float32)
    started = time.perf_counter()
    expected = ex.shap_values(x)
    print(f"single process: {time.perf_counter() - started:.1f} s")
    ds = ray_cluster.data.from_numpy(np.array_split(x, 8)).rename_columns({"data": "x"})
    started = time.perf_counter()
    result = explain_dataset(ds, ex, concurrency=2, batch_size=10_000).take_batch(batch_size=len(x))
    print(f"ray dataset: {time.perf_counter() - started:.1f} s")
    got, want = _by_rows(result["x"]), _by_rows(x)
    np.testing.assert_array_equal(result["x"][got], x[want])  # every row came back once
    np.testing.assert_array_equal(result["shap_x"][got], expected[want])


def test_pandas_batches_with_feature_columns_give_one_column_per_feature_and_output(explainer, rows):
    from onnxshap.integrations.ray import ExplainBatch

    frame = pd.DataFrame(rows[:50], columns=[f"f{i}" for i in range(8)])
    frame["id"] = np.arange(50)
    explain = ExplainBatch(explainer, columns=[f"f{i}" for i in range(8)])
    result = explain(frame)
    values = explainer.shap_values(rows[:50])  # (50, 8, 2)
    assert list(result.columns[:9]) == [*frame.columns]
    for i in range(8):
        for j in range(2):
            np.testing.assert_array_equal(result[f"shap_f{i}_{j}"].to_numpy(), values[:, i, j])
    ranked = ExplainBatch(explainer, columns=[f"f{i}" for i in range(8)], ranked_outputs=1, keep_columns=False)
    top = ranked(frame)
    top_values, top_index = explainer.shap_values(rows[:50], ranked_outputs=1)
    np.testing.assert_array_equal(top["output_index_rank0"].to_numpy(), top_index[:, 0])
    np.testing.assert_array_equal(top["shap_f3_rank0"].to_numpy(), top_values[:, 3, 0])


def test_a_batch_without_the_input_column_is_one_clear_error(explainer, rows):
    from onnxshap.errors import InputDataError
    from onnxshap.integrations.ray import ExplainBatch

    with pytest.raises(InputDataError, match="batch has no column 'x'; its columns are 'features'"):
        ExplainBatch(explainer)({"features": rows})
    with pytest.raises(UsageError, match="single model input with one feature axis"):
        ExplainBatch(explainer, columns=["a", "b"])


def _shap_partition(part: pd.DataFrame, explainer) -> pd.DataFrame:
    """The README's Dask recipe."""
    values = np.atleast_3d(explainer.shap_values(part[explainer.feature_names].to_numpy(np.float32)))  # (rows, F, k)
    columns = {f"shap_{f}_{j}": values[:, i, j] for i, f in enumerate(explainer.feature_names)
               for j in range(values.shape[-1])}
    return pd.DataFrame(columns, index=part.index)


def test_dask_map_partitions_recipe_gives_the_single_process_values(rows):
    import dask.dataframe as dd

    names = [f"f{i}" for i in range(8)]
    background = pd.DataFrame(np.random.default_rng(6).normal(size=(16, 8)).astype(np.float32), columns=names)
    ex = onnxshap.DeepExplainer(mlp(seed=7), background)
    frame = pd.DataFrame(rows, columns=names)
    meta = pd.DataFrame({f"shap_{f}_{j}": pd.Series(dtype=np.float32) for f in names for j in range(2)})
    result = dd.from_pandas(frame, npartitions=4).map_partitions(_shap_partition, ex, meta=meta)
    computed = result.compute(scheduler="processes")  # each task gets a pickled explainer
    expected = ex.shap_values(rows)
    np.testing.assert_array_equal(computed.to_numpy().reshape(-1, 8, 2), expected)
