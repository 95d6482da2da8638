"""The suite runs without onnxshap's user cache: nothing is written to the user's cache folder and every test
builds its own graphs. ``test_cache.py`` turns the cache on in a temporary folder."""

import os

os.environ.setdefault("ONNXSHAP_CACHE", "0")
