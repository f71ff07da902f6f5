import pytest
import torch

# The tests' networks are tiny: one thread is faster and does not oversubscribe a shared machine.
torch.set_num_threads(1)


@pytest.fixture
def dataset_store(tmp_path, monkeypatch):
    """An empty Minari root and cqlsac cache for one test: (root, cache)."""
    root, cache = tmp_path / "minari", tmp_path / "cache"
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(root))
    monkeypatch.setenv("CQLSAC_CACHE", str(cache))
    return root, cache
