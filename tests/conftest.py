import os

import pytest


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Every test gets its own dataset cache, except mnist-5k's parsed copy which is shared
    (parsing the CSV takes a few tenths of a second)."""
    shared = tmp_path_factory.getbasetemp() / "bnlab-cache"
    monkeypatch.setenv("BNLAB_DATA", str(shared))
    os.environ.setdefault("COLUMNS", "160")
    yield
