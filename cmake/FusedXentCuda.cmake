# Optional CUDA kernels (being written).
