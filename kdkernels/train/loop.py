"""The training loop shared by every task: AdamW with linear warm-up and cosine decay, gradient
accumulation, evaluation and checkpoints every K steps, ``metrics.jsonl``, bit-for-bit resume.

A run is a :class:`Run`: a module holding every trainable parameter, a loss of a batch, a batch
sampler driven by a ``torch.Generator`` (whose state is checkpointed, so a resumed run sees the
same batches), and an evaluation. :func:`fit` trains it for ``steps`` optimizer steps.

Under ``torchrun`` the run's modules train under ``DistributedDataParallel``, or with ``--fsdp``
sharded by FSDP2 (``torch.distributed.fsdp.fully_shard``): every element of the run's
``nn.ModuleList``s (a transformer's blocks) is a shard group, the parameters left (embeddings,
head, a hint projection) are the root's. Their checkpoints are then sharded too
(``torch.distributed.checkpoint``), and after :func:`fit` the modules stay sharded:
:func:`full_state_dict` gathers their weights and :func:`unsharded` rebuilds a plain module.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
from dataclasses import dataclass
from typing import Callable

import torch

from kdkernels.train import dist
from kdkernels.train.checkpoint import CheckpointError, load_checkpoint, rng_state, save_checkpoint, set_rng_state
from kdkernels.train.config import Config

__all__ = ["Run", "fit", "cosine_schedule", "read_metrics", "full_state_dict", "unsharded", "is_sharded"]


@dataclass
class Run:
    name: str
    model: torch.nn.Module  # every trainable parameter of the run (e.g. the student and its hint projection)
    loss: Callable  # (batch) -> (loss tensor, {name: float})
    sample: Callable  # (generator, batch_size) -> batch
    evaluate: Callable  # () -> {name: float}


def cosine_schedule(warmup: int, total: int) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def read_metrics(path: str) -> list:
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _append(path: str, record: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def _drop_after(path: str, name: str, step: int) -> None:
    """Forget this run's records past ``step`` (they are about to be written again)."""
    keep = [r for r in read_metrics(path) if not (r.get("run") == name and r.get("step", 0) > step)]
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in keep)
    os.replace(tmp, path)


class _Step(torch.nn.Module):
    """A run's loss as the forward of a module that holds its trainable parameters:
    ``DistributedDataParallel`` and FSDP2 act in a module's forward (DDP prepares its gradient
    buckets, FSDP2 gathers the parameters), while a run's loss calls its modules directly. Under
    FSDP2 the evaluation is a forward method too, so the root's parameters are gathered for it."""

    def __init__(self, model: torch.nn.Module, loss: Callable, evaluate: Callable):
        super().__init__()
        self.model = model
        self.loss = loss
        self.run_evaluate = evaluate

    def forward(self, batch):
        return self.loss(batch)

    def evaluate(self):
        return self.run_evaluate()


def is_sharded(module: torch.nn.Module) -> bool:
    """Whether ``module`` holds FSDP2-sharded parameters (DTensors), as after ``fit`` with
    ``--fsdp`` under ``torchrun``."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in module.parameters())


def full_state_dict(module: torch.nn.Module) -> dict:
    """``module``'s state dict with every tensor whole: its own for a plain module, gathered over
    the ranks for an FSDP2-sharded one (a collective: every rank calls it)."""
    if not is_sharded(module):
        return module.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(module, options=StateDictOptions(full_state_dict=True))


def unsharded(module: torch.nn.Module, build: Callable[[], torch.nn.Module]) -> torch.nn.Module:
    """``module`` itself when it is plain; for an FSDP2-sharded one, ``build()`` (a new module of
    the same architecture) holding its gathered weights, in ``module``'s train/eval mode and
    ``requires_grad`` (a collective: every rank calls it)."""
    if not is_sharded(module):
        return module
    state = full_state_dict(module)
    plain = build()
    plain.load_state_dict(state)
    plain.train(module.training)
    for p, q in zip(plain.parameters(), module.parameters()):
        p.requires_grad_(q.requires_grad)
    return plain


def _shard(step: _Step) -> None:
    """FSDP2: every element of the run's ``nn.ModuleList``s its own group (inner lists first), then
    the step module (the root: every parameter left); the evaluation a forward method."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    device = next(step.model.parameters()).device
    mesh = init_device_mesh(device.type, (dist.world(),))
    blocks, seen = [], set()
    for lst in step.model.modules():
        if isinstance(lst, torch.nn.ModuleList):
            for m in lst:
                if id(m) not in seen and any(True for _ in m.parameters()):
                    seen.add(id(m))
                    blocks.append(m)
    for m in reversed(blocks):  # modules() is pre-order: an inner list's elements come after their parent
        fully_shard(m, mesh=mesh)
    fully_shard(step, mesh=mesh)
    register_fsdp_forward_method(step, "evaluate")


def _shards_of(run_dir: str) -> list:
    return sorted(d for d in os.listdir(run_dir) if d.startswith("shards-")) if os.path.isdir(run_dir) else []


def fit(run: Run, cfg: Config, steps: int, out_dir: str, *, seed: int, lr: float = None) -> dict:
    """Train ``run`` for ``steps`` optimizer steps (or continue it, with ``cfg.resume``); returns
    its final evaluation. Checkpoints go to ``out_dir/<run.name>/checkpoint.pt`` every
    ``cfg.ckpt_every`` steps and at the end; metrics to ``out_dir/metrics.jsonl``. Under
    ``torchrun`` every rank samples its own batches (seed + rank) and the run's modules train under
    ``torch.nn.parallel.DistributedDataParallel``, or with ``cfg.fsdp`` sharded by FSDP2: the
    backward averages the gradients over the ranks once a step (``no_sync()``, or FSDP2's
    ``set_requires_gradient_sync(False)``, on the other micro-batches); rank 0 writes.

    With FSDP2 each rank saves its shards of the weights and of the optimizer's state with
    ``torch.distributed.checkpoint`` in ``<run.name>/shards-<step>/``; ``checkpoint.pt``, written
    last and atomically, names the shards, so a crash leaves the previous complete checkpoint."""
    os.makedirs(out_dir, exist_ok=True)
    run_dir = os.path.join(out_dir, run.name)
    ckpt = os.path.join(run_dir, "checkpoint.pt")
    metrics = os.path.join(out_dir, "metrics.jsonl")
    step_module = _Step(run.model, run.loss, run.evaluate)
    fsdp = cfg.fsdp and dist.world() > 1
    if fsdp:
        _shard(step_module)  # before the optimizer: its parameters are the shards
    params = [p for p in run.model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr or cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, cosine_schedule(cfg.warmup, steps))
    main = dist.is_main()
    autocast = cfg.autocast and any(p.is_cuda for p in params)
    sampler = torch.Generator().manual_seed(seed + 1000 * dist.rank())
    step = 0
    if cfg.resume and os.path.exists(ckpt):
        state = load_checkpoint(ckpt)
        if len(state["rng"]) != dist.world():
            raise CheckpointError(f"{ckpt!r} was written by {len(state['rng'])} processes; resume it with as many "
                                  f"(this run has {dist.world()})")
        if ("shards" in state) != fsdp:
            how = "with" if "shards" in state else "without"
            raise CheckpointError(f"{ckpt!r} was written {how} --fsdp; resume it {how} --fsdp (or start this run "
                                  "over without --resume)")
        if fsdp:
            import torch.distributed.checkpoint as dcp
            from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

            model_state, optim_state = get_state_dict(run.model, opt)
            shards = {"model": model_state, "optimizer": optim_state}
            dcp.load(shards, checkpoint_id=os.path.join(run_dir, state["shards"]))
            set_state_dict(run.model, opt, model_state_dict=shards["model"], optim_state_dict=shards["optimizer"])
        else:
            run.model.load_state_dict(state["model"])
            opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        set_rng_state(state["rng"][dist.rank()], sampler)
        step = state["step"]
        if main:
            _drop_after(metrics, run.name, step)
    elif main:
        _drop_after(metrics, run.name, -1)

    def checkpoint():
        rngs = dist.gather_objects(rng_state(sampler))  # every rank's RNG and sampler states
        record = {"scheduler": sched.state_dict(), "step": step, "rng": rngs, "config": cfg.to_dict(),
                  "run": run.name, "world_size": dist.world()}
        if fsdp:
            import torch.distributed.checkpoint as dcp
            from torch.distributed.checkpoint.state_dict import get_state_dict

            name = f"shards-{step:09d}"
            model_state, optim_state = get_state_dict(run.model, opt)
            dcp.save({"model": model_state, "optimizer": optim_state}, checkpoint_id=os.path.join(run_dir, name))
            dist.barrier()  # every rank's shards are on disk before checkpoint.pt names them
            record["shards"] = name
        else:
            record.update(model=run.model.state_dict(), optimizer=opt.state_dict())
        if main:
            save_checkpoint(ckpt, record)
            for old in _shards_of(run_dir):
                if old != record.get("shards"):
                    shutil.rmtree(os.path.join(run_dir, old), ignore_errors=True)
        dist.barrier()

    def evaluate():
        run.model.eval()
        with torch.no_grad():
            if not fsdp:
                return run.evaluate()
            try:  # through the root's forward method: it gathers the root's parameters (the blocks gather their own)
                return step_module.evaluate()
            finally:
                step_module.reshard()

    def log(record):
        if main:
            _append(metrics, record)

    ddp = dist.world() > 1 and not fsdp
    if ddp:  # rank 0's weights are broadcast; every backward averages the gradients over the ranks
        step_module = torch.nn.parallel.DistributedDataParallel(step_module, find_unused_parameters=True)
    from tqdm.auto import tqdm

    bar = tqdm(total=steps, initial=step, desc=run.name, disable=not (cfg.progress and main), dynamic_ncols=True,
               leave=True)
    run.model.train()
    loss_value = float("nan")
    final = None  # the evaluation of the last step, returned rather than computed twice
    while step < steps:
        opt.zero_grad(set_to_none=True)
        logs: dict = {}
        loss_value = 0.0
        for micro in range(cfg.grad_accum):
            # the ranks' gradients are averaged once a step, in the last micro-batch's backward
            last = micro == cfg.grad_accum - 1
            sync = step_module.no_sync() if ddp and not last else contextlib.nullcontext()
            if fsdp:
                step_module.set_requires_gradient_sync(last)
            with sync:
                with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
                    loss, parts = step_module(run.sample(sampler, cfg.batch_size))
                (loss / cfg.grad_accum).backward()
            loss_value += float(loss.detach()) / cfg.grad_accum
            for k, v in parts.items():
                logs[k] = logs.get(k, 0.0) + float(v) / cfg.grad_accum
        opt.step()
        sched.step()
        step += 1
        loss_value = dist.all_mean(loss_value)
        log({"run": run.name, "step": step, "loss": loss_value, "lr": sched.get_last_lr()[0], **logs})
        if step % cfg.eval_every == 0 or step == steps:
            final = evaluate()
            log({"run": run.name, "step": step, "eval": final})
            run.model.train()
        if step % cfg.ckpt_every == 0 or step == steps:
            checkpoint()
        bar.update(1)
        bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{sched.get_last_lr()[0]:.2e}", refresh=False)
    bar.close()
    if final is None:  # resumed from the last checkpoint: nothing left to train
        final = evaluate()
    run.model.eval()
    return final
