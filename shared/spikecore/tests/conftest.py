import os

import torch

# Without a GPU, the Triton kernels run on the CPU through Triton's interpreter. The variable must be set
# before any kernel module is imported, so it is set here, at collection time.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
