"""Kernel runtime: launch plans, NVRTC compilation, the disk cache and the
``cuda`` backend. Nothing here imports cupy or torch at module import."""
