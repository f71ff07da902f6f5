import pytest


@pytest.fixture
def dataset_store(tmp_path, monkeypatch):
    """An empty Minari root and cqlsac cache for one test: (root, cache)."""
    root, cache = tmp_path / "minari", tmp_path / "cache"
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(root))
    monkeypatch.setenv("CQLSAC_CACHE", str(cache))
    return root, cache
