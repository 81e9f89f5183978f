"""Helpers shared by the spikecore tests (uniquely named: all packages' tests share one sys.path)."""

import pytest
import torch

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
