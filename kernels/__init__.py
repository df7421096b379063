"""CuPy kernels for the performance-critical layers (optional: needs CUDA and CuPy)."""
