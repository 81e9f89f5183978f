import logging
import warnings

import pytest
import torch
from sae_brainmap_testing import planted_data

logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
warnings.filterwarnings("ignore", ".*does not have many workers.*")


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread in this package's tests: the CI machine has 2 noisy cores, OpenMP barriers stall
    under contention, and the CPU-time budgets asserted here assume it. Restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def planted():
    return planted_data()
