"""The fused-linear losses with DTensor weights (tensor parallelism, or FSDP2 parameters read
outside their module's forward), registered with :mod:`kdkernels._core.sharded`.

``kdkernels.fused_linear_kl`` and ``kdkernels.fused_linear_topk_kl`` hand a call with DTensor
arguments here:

* the rows (hidden states, labels) the same on every rank of the weights' mesh and every weight
  ``Shard(0)`` on a 1-D mesh with the student's and teacher's vocabularies split alike (column-
  parallel lm_heads), no cross-entropy term and no ``vocab_size``: the vocab-parallel loss
  (:func:`kdkernels.distributed.vocab_parallel_fused_linear_kl`) on each rank's slice, over the
  mesh's process group. No weight is gathered; each rank's slice gets its gradient.
* otherwise the DTensors are gathered for the call (``full_tensor``) and the single-process loss
  runs. The gradients return with each tensor's own placement: where the rows are the same on every
  rank the gathered gradient is every rank's (its local part is kept); where they differ (data
  parallelism: FSDP2) it is averaged over the ranks and scattered (a reduce-scatter), as FSDP2
  averages the gradients of its own forward.

Which case holds is decided by one all-reduce of a fingerprint of the rows (their shape, sum and
sum of squares, per tensor) over the mesh's group: a host read, once per call.

(Under ``fully_shard(model)``, the root's parameters stay unsharded from its forward to its
backward: a loss computed after ``model(...)`` reads plain tensors and never comes here.)
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from kdkernels._core import sharded
from kdkernels.distributed.vocab_parallel import vocab_parallel_fused_linear_kl

__all__ = ["same_rows"]


def same_rows(group, *tensors) -> bool:
    """Whether the (plain) tensors are the same on every rank of ``group``: their shapes, sums and
    sums of squares compared by one all-reduce (MAX of the fingerprint and of its negation)."""
    parts = []
    for x in tensors:
        if x is None:
            continue
        x64 = x.detach().double()
        parts += [float(x.numel()), *[float(s) for s in x.shape[:2]], x64.sum().item(), x64.square().sum().item()]
    f = torch.tensor(parts, dtype=torch.float64)
    both = torch.cat([f, -f])
    dist.all_reduce(both, op=dist.ReduceOp.MAX, group=group)
    return bool(torch.equal(both[:len(parts)], -both[len(parts):]))


class _ScaleGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, factor):
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return g * ctx.factor, None


def _gathered(x, same: bool):
    """A DTensor gathered whole, differentiably: its gradient returns with its placement, taken as
    every rank's (``same``) or averaged over the ranks (Partial, then scaled by 1 / world)."""
    from torch.distributed.tensor import DTensor, Partial, Replicate

    if not isinstance(x, DTensor):
        return x
    mesh = x.device_mesh
    replicated = x.redistribute(mesh, [Replicate()] * mesh.ndim)
    if same:
        return replicated.to_local()
    local = replicated.to_local(grad_placements=[Partial()] * mesh.ndim)
    return _ScaleGrad.apply(local, 1.0 / mesh.size())


def _mesh_group(tensors):
    from torch.distributed.tensor import DTensor

    meshes = {id(x.device_mesh): x.device_mesh for x in tensors if isinstance(x, DTensor)}
    if len(meshes) != 1:
        raise ValueError("the DTensor arguments must share one device mesh, got "
                         f"{len(meshes)} meshes")
    mesh = next(iter(meshes.values()))
    if mesh.ndim != 1:
        raise ValueError(f"DTensor weights on a {mesh.ndim}-D mesh: kdkernels handles 1-D meshes (pass the weight's "
                         f"local tensor, or one gathered over the other dimensions)")
    return mesh, mesh.get_group()


def _local_rows(x):
    """Row tensors (hidden states, logits, labels) as plain tensors: a DTensor's full value."""
    from torch.distributed.tensor import DTensor

    return x.full_tensor() if isinstance(x, DTensor) else x


def _vocab_sharded(w, mesh) -> bool:
    from torch.distributed.tensor import DTensor, Shard

    return isinstance(w, DTensor) and w.device_mesh is mesh and mesh.ndim == 1 and \
        tuple(w.placements) == (Shard(0),)


def _fused_linear_kl(fn, kw: dict) -> Tensor:
    weights = ("student_weight", "student_bias", "teacher_weight", "teacher_bias")
    mesh, group = _mesh_group([kw[k] for k in (*weights, "student_hidden", "teacher_hidden", "teacher_logits")])
    rows = {k: _local_rows(kw[k]) for k in ("student_hidden", "teacher_hidden", "teacher_logits", "labels")}
    same = same_rows(group, *rows.values())
    vocab_parallel = (same and kw["alpha"] == 0 and kw["vocab_size"] is None and rows["teacher_logits"] is None
                      and _vocab_sharded(kw["student_weight"], mesh) and _vocab_sharded(kw["teacher_weight"], mesh)
                      and all(kw[b] is None or _vocab_sharded(kw[b], mesh) for b in ("student_bias", "teacher_bias"))
                      and kw["student_weight"].to_local().shape[0] == kw["teacher_weight"].to_local().shape[0]
                      and kw["backend"] in ("auto", "torch"))
    if vocab_parallel:
        local = {k: (None if kw[k] is None else kw[k].to_local()) for k in weights}
        return vocab_parallel_fused_linear_kl(
            rows["student_hidden"], local["student_weight"], rows["teacher_hidden"], local["teacher_weight"],
            student_bias=local["student_bias"], teacher_bias=local["teacher_bias"], temperature=kw["temperature"],
            divergence=kw["divergence"], beta=kw["beta"], labels=rows["labels"], ignore_index=kw["ignore_index"],
            reduction=kw["reduction"], group=group, skew=kw["skew"], num_items_in_batch=kw["num_items_in_batch"],
            student_softcap=kw["student_softcap"], teacher_softcap=kw["teacher_softcap"],
            student_logit_scale=kw["student_logit_scale"], teacher_logit_scale=kw["teacher_logit_scale"])
    args = dict(kw, **rows)
    for k in weights:
        args[k] = _gathered(kw[k], same)
    return fn(**args)


def _fused_linear_topk_kl(fn, kw: dict) -> Tensor:
    mesh, group = _mesh_group([kw[k] for k in ("student_weight", "student_bias", "student_hidden")])
    rows = {k: _local_rows(kw[k]) for k in ("student_hidden", "teacher_topk_values", "teacher_topk_indices",
                                            "labels")}
    same = same_rows(group, *rows.values())
    args = dict(kw, **rows)
    for k in ("student_weight", "student_bias"):
        args[k] = _gathered(kw[k], same)
    return fn(**args)


sharded.register("fused_linear_kl", _fused_linear_kl)
sharded.register("fused_linear_topk_kl", _fused_linear_topk_kl)
