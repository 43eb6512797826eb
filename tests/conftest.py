import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def reference_dir() -> Path:
    """Folder of official golden files: $SWAV_REFERENCE_DIR, default ../shared/golden beside the repo."""
    return Path(os.environ.get("SWAV_REFERENCE_DIR", REPO.parent / "shared" / "golden"))


@pytest.fixture
def cpu_threads():
    """Run with 2 intra-op threads (the golden files were produced with 2-thread CPU kernels; see
    tests/test_parity.py), restoring the previous setting afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)
