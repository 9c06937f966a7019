"""Triton kernels and their launchers, one module per loss family.

Importing this package needs ``triton``; the modules under it run on a GPU, or on the CPU
with ``TRITON_INTERPRET=1`` (set before triton is imported).
"""
