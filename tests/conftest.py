import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))  # tests/helpers.py

# Without a GPU, the Triton kernels run on CPU tensors in triton's interpreter; it must be chosen before triton
# is imported (by vqkernels, below in the test modules).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def nan_poisoned_empty():
    """Fill every torch.empty (Python and C++ alike) with NaN / int max, so an unwritten output cannot pass."""
    import torch.utils.deterministic as det

    old_det, old_fill = torch.are_deterministic_algorithms_enabled(), det.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True, warn_only=True)
    det.fill_uninitialized_memory = True
    yield
    det.fill_uninitialized_memory = old_fill
    torch.use_deterministic_algorithms(old_det)
