import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One intra-op thread: these tests use tiny networks, where a second thread only adds
    synchronisation (and on a busy shared CPU, much more than that)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
