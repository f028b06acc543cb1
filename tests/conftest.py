"""Test-wide settings."""
import torch

# One torch thread per test process. pytest-xdist runs a worker per core, and two OpenMP teams
# per core make every small op wait on spinning threads (tens of times slower); the tests'
# tensors are small, so a single thread is also the fastest choice without xdist.
torch.set_num_threads(1)
