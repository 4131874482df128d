"""Triton paged-attention kernels (installed as sharedecode.kernels)."""
