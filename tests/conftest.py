"""The suite runs without onnxshap's user cache: nothing is written to the user's cache folder and every test
builds its own graphs. ``test_cache.py`` turns the cache on in a temporary folder."""

import os
from pathlib import Path

import pytest

os.environ.setdefault("ONNXSHAP_CACHE", "0")


@pytest.fixture(scope="session")
def zoo_cache(request, tmp_path_factory) -> Path:
    """Where the architecture zoo's exports are cached: pytest's cache folder (they survive between runs, and
    every test file that exports zoo models shares them); a session temp folder under ``-p no:cacheprovider``."""
    cache = getattr(request.config, "cache", None)
    if cache is None:
        return tmp_path_factory.mktemp("onnxshap-arch-zoo")
    return Path(cache.mkdir("onnxshap-arch-zoo"))
