"""Test-wide settings."""
import os

import torch

# pytest-xdist runs several workers on the same cores. Two OpenMP teams per core make every
# small op wait on spinning threads (tens of times slower), so each worker gets its share.
_workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _workers > 1:
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // _workers))
