"""First-use verification of kernels and primitive self-tests."""
