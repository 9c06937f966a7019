"""The one helper that defines a fused loss op: :class:`FusedOp`.

A fused loss computes its loss and its input gradients in the same pass (the kernels write the
gradients pre-multiplied by ``grad_scale``: ``1/rows`` for a mean), so backward only scales them by
``grad_output``. :class:`FusedOp` turns a family's ``kernel`` into a ``torch.library`` operator ``kdkernels::<name>``
(opaque to ``torch.compile``, so ``fullgraph=True`` calls the fused kernel instead of tracing into
it) with

* its fake (meta) implementation: the loss (a ``[N]`` row vector for ``reduction="none"``, else a
  scalar, in the accumulation dtype) and gradients shaped and typed like their inputs;
* its autograd: backward hands the saved gradients over as they are when ``grad_output`` is 1
  (``loss.backward()`` on the loss itself) on CPU tensors, and scales them in place elsewhere (no
  ``grad_output == 1`` test, which would sync the host with the device; no second buffer either),
  so the peak extra memory of a step is the gradients plus the kernel's O(tile) workspace;
* its ``reduction="none"`` path: per-row losses, whose gradients depend on each row's
  ``grad_output``. ``none="scale_rows"`` (row-local losses such as softmax-KL: the gradient of a
  row depends on that row only) computes them in the forward pass and scales each row in backward;
  ``none="recompute"`` (losses whose gradients sum over rows: weights, embeddings) runs the kernel
  again in backward with ``grad_scale`` = the per-row ``grad_output``.

Because backward hands over (or scales in place) the gradient the forward wrote, a graph can be
differentiated once: ``backward(retain_graph=True)`` followed by a second backward raises
PyTorch's "modified by an inplace operation" error on CUDA tensors instead of returning a wrong
gradient. Recompute the loss to differentiate it again.

The kernel's contract: ``kernel(backend, inputs, extras, grad_scale, need, **params)`` returns
``(rows, *grads)``: ``rows`` the ``[N]`` per-row losses in the accumulation dtype, then one gradient
per input (None where ``need`` is False), pre-multiplied by ``grad_scale`` (a 0-d tensor, or one
value per row in the recompute path) and of the input's number of elements (row-shaped gradients of
``[B, L, D]`` inputs may come back ``[N, D]``).
"""

from __future__ import annotations

import functools
import sys
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from kdkernels._core import numerics
from kdkernels._core.numerics import acc_dtype
from kdkernels._core.rows import row_count

_TYPES = {float: "float", int: "int", bool: "bool", str: "str"}

# one library fragment for every kdkernels op. Ops are defined with Library.define + impl rather than
# torch.library.custom_op, whose kernels import torch._dynamo (with sympy and triton, about 150 MiB
# resident) on their first eager call; see _no_dynamo.
_LIB = torch.library.Library("kdkernels", "FRAGMENT")
OPS: Dict[str, FusedOp] = {}  # by qualified name, for tools that look inside an op (the tests' sync probe)


def _no_dynamo(fn):
    """``fn`` hidden from TorchDynamo, as custom_op hides its kernels, without importing it: when
    nothing has imported ``torch._dynamo`` no compilation can be running, so the guard is only
    built (once) after that."""
    guarded = []

    @functools.wraps(fn)
    def run(*args, **kwargs):
        if "torch._dynamo" not in sys.modules:
            return fn(*args, **kwargs)
        if not guarded:
            guarded.append(torch._dynamo.disable(fn, recursive=True))
        return guarded[0](*args, **kwargs)

    return run


def scales_in_place(device: torch.device) -> bool:
    """Whether backward scales a saved gradient in place on ``device`` rather than testing
    ``grad_output == 1`` on the host (which would sync a CUDA device)."""
    return not numerics.host_reads_free(device)


def scale_saved(g: Optional[Tensor], grad_output: Tensor) -> Optional[Tensor]:
    """The saved gradient ``g`` times ``grad_output`` (broadcast over ``g``'s trailing dimensions).

    Traced by torch.compile: a plain product. Eager, CPU tensors: ``g`` itself when ``grad_output``
    is exactly 1 (a free host check), else a product. Eager, other devices: ``g`` scaled in place
    (no host sync, no second buffer)."""
    if g is None or grad_output is None:
        return None
    go = grad_output.to(g.dtype)
    if go.dim():  # per-row grad_outputs (reduction="none"): one per row of g
        go = go.reshape(*g.shape[:-1], 1)
    if torch.compiler.is_compiling() or type(g) is not torch.Tensor:
        return g * go
    if not scales_in_place(g.device):
        if go.numel() == 1 and bool(go.item() == 1.0):
            return g
        return g * go
    return g.mul_(go)


class FusedOp:
    """A fused loss op ``kdkernels::<name>``: see the module docstring.

    Args:
        name: the op's qualified name, ``"kdkernels::softmax_kl"``.
        inputs: the names of the differentiable tensor arguments (each may be None).
        extras: the names of the other tensor arguments (labels, indices, masks; each may be None).
        params: ``{name: type}`` of the non-tensor arguments (float, int, bool, str, or a schema
            type string such as ``"int?"``), in order.
        kernel: the family's kernel dispatcher (the contract above).
        none: ``"scale_rows"`` or ``"recompute"``, the ``reduction="none"`` path.
        rows: the number of loss rows from (inputs, extras); default: the rows of the first input.
    """

    def __init__(self, name: str, *, inputs: Sequence[str], extras: Sequence[str] = (),
                 params: Dict[str, type], kernel: Callable, none: str = "recompute",
                 rows: Optional[Callable] = None):
        if none not in ("scale_rows", "recompute"):
            raise ValueError(f"none must be 'scale_rows' or 'recompute', got {none!r}")
        self.name, self.kernel, self.none = name, kernel, none
        self.inputs, self.extras, self.params = tuple(inputs), tuple(extras), dict(params)
        self.rows = rows or (lambda ins, ext: row_count(ins[0]))
        self.n_in, self.n_ex = len(self.inputs), len(self.extras)
        args = [f"Tensor? {n}" for n in (*self.inputs, *self.extras)] + ["Tensor grad_scale"]
        args += [f"{t if isinstance(t, str) else _TYPES[t]} {n}" for n, t in self.params.items()]
        args += ["int reduction", "bool[] need", "str backend"]
        namespace, _, op_name = name.partition("::")
        if namespace != "kdkernels":
            raise ValueError(f"kdkernels ops live in the kdkernels namespace, got {name!r}")
        _LIB.define(f"{op_name}({', '.join(args)}) -> Tensor[]")
        torch.library.impl(name, "CompositeExplicitAutograd", _no_dynamo(self._forward), lib=_LIB)
        torch.library.register_fake(name, self._fake, lib=_LIB)
        torch.library.register_autograd(name, self._backward, setup_context=self._setup_context, lib=_LIB)
        self.op = getattr(torch.ops.kdkernels, op_name).default
        # the backward that runs kernels (recompute, statistics) is an op too: torch.compile traces a
        # registered backward, and must meet an opaque call there rather than the kernels themselves
        _LIB.define(f"{op_name}_backward({', '.join(args + self._backward_args())}) -> Tensor[]")
        torch.library.impl(name + "_backward", "CompositeExplicitAutograd", _no_dynamo(self._backward_impl), lib=_LIB)
        torch.library.register_fake(name + "_backward", self._backward_fake, lib=_LIB)
        self.backward_op = getattr(torch.ops.kdkernels, op_name + "_backward").default
        OPS[name] = self

    # ---- argument plumbing
    def _split(self, args):
        ni, ne, npar = self.n_in, self.n_ex, len(self.params)
        ins, ext = tuple(args[:ni]), tuple(args[ni:ni + ne])
        grad_scale = args[ni + ne]
        prm = dict(zip(self.params, args[ni + ne + 1:ni + ne + 1 + npar]))
        # (a backward op's extra arguments follow)
        reduction, need, backend = args[ni + ne + 1 + npar:ni + ne + 4 + npar]
        return ins, ext, grad_scale, prm, reduction, tuple(bool(x) for x in need), backend

    def _grads_in_forward(self, reduction: int) -> bool:
        return reduction != 0 or self.none == "scale_rows"

    def _run(self, backend, ins, ext, grad_scale, need, prm) -> Tuple[Tensor, List[Optional[Tensor]]]:
        rows, *grads = self.kernel(backend, ins, ext, grad_scale, need, **prm)
        out = []
        for g, x in zip(grads, ins):
            if g is not None:
                if g.shape != x.shape:
                    g = g.view(x.shape)  # [N, D] rows of a [B, L, D] input, written contiguous
                if g.dtype != x.dtype:
                    g = g.to(x.dtype)
            out.append(g)
        return rows, out

    # ---- the op
    def _forward(self, *args) -> List[Tensor]:
        ins, ext, grad_scale, prm, reduction, need, backend = self._split(args)
        fwd_need = need if self._grads_in_forward(reduction) else (False,) * self.n_in
        rows, grads = self._run(backend, ins, ext, grad_scale, fwd_need, prm)
        loss = rows if reduction == 0 else rows.sum() * grad_scale.to(rows.dtype)
        first = next(x for x in ins if x is not None)
        # a custom op cannot return None: an absent gradient is an empty tensor
        return [loss] + [g if g is not None else first.new_empty(0) for g in grads]

    def _fake(self, *args) -> List[Tensor]:
        ins, ext, grad_scale, prm, reduction, need, backend = self._split(args)
        first = next(x for x in ins if x is not None)
        acc = acc_dtype(*ins)
        loss = first.new_empty((self.rows(ins, ext),) if reduction == 0 else (), dtype=acc)
        fwd = self._grads_in_forward(reduction)
        return [loss] + [torch.empty(x.shape, dtype=x.dtype, device=x.device) if (x is not None and need[i] and fwd)
                         else first.new_empty(0) for i, x in enumerate(ins)]

    # ---- autograd
    def _setup_context(self, ctx, inputs, output):
        ins, ext, _gs, prm, reduction, need, backend = self._split(inputs)
        ctx.set_materialize_grads(False)  # the gradient outputs are never differentiated
        ctx.reduction, ctx.need, ctx.backend, ctx.prm = reduction, need, backend, prm
        if not self._grads_in_forward(reduction):
            ctx.save_for_backward(*ins, *ext)
        else:
            ctx.save_for_backward(*[g if need[i] else None for i, g in enumerate(output[1:])])

    def _backward(self, ctx, grads):
        grad_loss = grads[0]
        tail = (None,) * (self.n_ex + 1 + len(self.params) + 3)
        if grad_loss is None:
            return (None,) * self.n_in + tail
        if not self._grads_in_forward(ctx.reduction):
            out = self.backward_op(*ctx.saved_tensors, grad_loss, *ctx.prm.values(), ctx.reduction, list(ctx.need),
                                   ctx.backend, *self._no_extra())
            return tuple(g if ctx.need[i] else None for i, g in enumerate(out)) + tail
        return tuple(scale_saved(g, grad_loss) for g in ctx.saved_tensors) + tail

    # ---- the backward op (recompute path): the forward's arguments, grad_scale the grad_output
    def _backward_args(self) -> List[str]:
        return []

    def _no_extra(self) -> tuple:
        return ()

    def _backward_impl(self, *args) -> List[Tensor]:
        ins, ext, grad_output, prm, reduction, need, backend = self._split(args)
        _, out = self._run(backend, ins, ext, grad_output, need, prm)
        first = next(x for x in ins if x is not None)
        return [g if g is not None else first.new_empty(0) for g in out]

    def _backward_fake(self, *args) -> List[Tensor]:
        ins, ext, grad_output, prm, reduction, need, backend = self._split(args)
        first = next(x for x in ins if x is not None)
        return [torch.empty(x.shape, dtype=x.dtype, device=x.device) if (x is not None and need[i])
                else first.new_empty(0) for i, x in enumerate(ins)]

    def __call__(self, inputs: Sequence[Optional[Tensor]], extras: Sequence[Optional[Tensor]], grad_scale: Tensor,
                 params: Dict[str, object], reduction: int, backend: str) -> Tensor:
        """Run the op: the loss (``[N]`` rows for ``reduction`` 0, else a scalar); the gradients of
        the inputs that require one (under grad mode) are computed on the way."""
        on = torch.is_grad_enabled()
        need = [bool(on and x is not None and x.requires_grad) for x in inputs]
        outs = self.op(*inputs, *extras, grad_scale, *[params[n] for n in self.params], reduction, need, backend)
        return outs[0]


class FusedStatsOp(FusedOp):
    """A fused op with several losses whose backward starts from statistics its forward saved,
    rather than from gradients it wrote (CLIP distillation: two losses from the same tiles, whose
    gradients depend on both grad_outputs; the backward reuses the forward's log-sum-exps).

    ``kernel(backend, inputs, extras, need, **params)`` returns ``(losses, stats)``: ``losses`` of
    them 0-d tensors, ``stats`` a list of tensors; ``backward(backend, inputs, extras, stats,
    grad_losses, need, **params)`` returns one gradient per input (None where ``need`` is False),
    given the losses' grad_outputs (0-d tensors; zeros for a loss left out of the graph);
    ``fake_stats(inputs, extras)`` gives empty tensors shaped like the stats. No host sync: the
    grad_outputs stay tensors."""

    def __init__(self, name: str, *, inputs: Sequence[str], extras: Sequence[str] = (), params: Dict[str, type],
                 kernel: Callable, backward: Callable, losses: int, fake_stats: Callable):
        self.backward_kernel, self.n_losses, self.fake_stats = backward, losses, fake_stats
        super().__init__(name, inputs=inputs, extras=extras, params=params, kernel=kernel, none="recompute")

    def _forward(self, *args) -> List[Tensor]:
        ins, ext, _gs, prm, _red, need, backend = self._split(args)
        losses, stats = self.kernel(backend, ins, ext, need, **prm)
        return [*losses, *stats]

    def _fake(self, *args) -> List[Tensor]:
        ins, ext, _gs, prm, _red, need, backend = self._split(args)
        first = next(x for x in ins if x is not None)
        acc = acc_dtype(*ins)
        return [first.new_empty((), dtype=acc) for _ in range(self.n_losses)] + list(self.fake_stats(ins, ext))

    def _setup_context(self, ctx, inputs, output):
        ins, ext, _gs, prm, _red, need, backend = self._split(inputs)
        ctx.set_materialize_grads(False)
        ctx.need, ctx.backend, ctx.prm = need, backend, prm
        ctx.save_for_backward(*ins, *ext, *output[self.n_losses:])

    def _backward(self, ctx, grads):
        tail = (None,) * (self.n_ex + 1 + len(self.params) + 3)
        saved = ctx.saved_tensors
        ins_ext, stats = saved[:self.n_in + self.n_ex], saved[self.n_in + self.n_ex:]
        if all(g is None for g in grads[:self.n_losses]):
            return (None,) * self.n_in + tail
        ref = next(g for g in grads[:self.n_losses] if g is not None)
        gl = [g if g is not None else torch.zeros_like(ref) for g in grads[:self.n_losses]]
        out = self.backward_op(*ins_ext, ref.new_ones(()), *ctx.prm.values(), 1, list(ctx.need), ctx.backend,
                               list(stats), gl)
        return tuple(g if ctx.need[i] else None for i, g in enumerate(out)) + tail

    def _backward_args(self) -> List[str]:
        return ["Tensor[] stats", "Tensor[] grad_losses"]

    def _backward_impl(self, *args) -> List[Tensor]:
        ins, ext, _gs, prm, _red, need, backend = self._split(args)
        stats, grad_losses = args[-2], args[-1]
        out = self.backward_kernel(backend, ins, ext, stats, grad_losses, need, **prm)
        first = next(x for x in ins if x is not None)
        return [g.to(x.dtype).view(x.shape) if g is not None else first.new_empty(0) for g, x in zip(out, ins)]

    def __call__(self, inputs, extras, params, backend) -> Tuple[Tensor, ...]:
        on = torch.is_grad_enabled()
        need = [bool(on and x is not None and x.requires_grad) for x in inputs]
        first = next(x for x in inputs if x is not None)
        outs = self.op(*inputs, *extras, first.new_ones(()), *[params[n] for n in self.params], 1, need, backend)
        return tuple(outs[:self.n_losses])
