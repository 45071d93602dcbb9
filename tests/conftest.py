import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))  # tests/reference.py
torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
os.environ.setdefault("PWSELF_CACHE_DIR", tempfile.mkdtemp(prefix="pwself-test-cache-"))  # never ~/.cache


@pytest.fixture(scope="session")
def fake_fmnist(tmp_path_factory):
    """IDX files whose train items are classes 0-4 (bright squares) and test items classes 5-9."""
    from test_data import _write_idx

    root = tmp_path_factory.mktemp("fmnist")
    rng = np.random.default_rng(0)
    for prefix, classes in (("train", range(0, 5)), ("t10k", range(5, 10))):
        labels = np.array([c for c in classes for _ in range(8)])
        images = np.zeros((len(labels), 28, 28), np.uint8)
        images[:, 6:22, 6:22] = rng.integers(120, 255, size=(len(labels), 16, 16))
        _write_idx(root / f"{prefix}-images-idx3-ubyte", images, 0x08)
        _write_idx(root / f"{prefix}-labels-idx1-ubyte", labels, 0x08)
    return root
