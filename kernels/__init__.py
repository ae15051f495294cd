"""Triton kernels of cnnviz-fast, installed as ``cnnviz_fast.kernels``.

Imported lazily by ``cnnviz_fast.ops`` only: importing triton at package import breaks on
machines without a GPU driver for some Triton versions (triton issue 6150).
"""
