"""Numeric helpers of the model and kernel tests. Kept out of conftest.py so tests/test_kernels.py also runs without
it (`pytest --noconftest`): on a GPU machine with only torch and triton (benchmarks/first_gpu.py)."""


def rel_err(a, b):
    """Largest absolute difference relative to the reference's largest magnitude."""
    return ((a - b).abs().max() / b.abs().max()).item()
