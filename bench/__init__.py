"""Microbenchmarks for kdkernels: ``python -m bench [family ...]``; see bench/README.md."""
