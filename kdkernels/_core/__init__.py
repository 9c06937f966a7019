"""The private core every loss family uses (nothing here imports a family, Triton or the public API):

* :mod:`~kdkernels._core.checks`: input checks, one function per kind of check;
* :mod:`~kdkernels._core.backends`: the backend registry (which op runs where, ``auto``, errors);
* :mod:`~kdkernels._core.fused_op`: :class:`FusedOp`, the one helper that defines a fused custom op;
* :mod:`~kdkernels._core.rows`: ``[..., D]`` tensors as strided ``[B, L, D]`` rows (no copies);
* :mod:`~kdkernels._core.numerics`: accumulation dtype, reductions, safe max, ``p log p`` terms;
* :mod:`~kdkernels._core.logit_options`: the token-level losses' shared vocabulary, global token
  count and logit transforms (scale, soft-cap);
* :mod:`~kdkernels._core.autocast`: matmul operands as autocast would give them, kernels without it;
* :mod:`~kdkernels._core.ext`: loading of the compiled extension ``kdkernels._C``;
* :mod:`~kdkernels._core.debug`: poisoned outputs for the tests;
* :mod:`~kdkernels._core.memory`: the peak-memory probe of tests, benchmarks and the trainer.
"""
