"""Backends lower a Graph to something that runs: eager PyTorch, TVM CUDA, x86 int8."""
