"""The training loop shared by every task: AdamW with linear warm-up and cosine decay, gradient
accumulation, evaluation and checkpoints every K steps, ``metrics.jsonl``, bit-for-bit resume.

A run is a :class:`Run`: a module holding every trainable parameter, a loss of a batch, a batch
sampler driven by a ``torch.Generator`` (whose state is checkpointed, so a resumed run sees the
same batches), and an evaluation. :func:`fit` trains it for ``steps`` optimizer steps.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from dataclasses import dataclass
from typing import Callable

import torch

from kdkernels.train import dist
from kdkernels.train.checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from kdkernels.train.config import Config

__all__ = ["Run", "fit", "cosine_schedule", "read_metrics"]


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
    buckets, FSDP2 gathers the parameters), while a run's loss calls its modules directly."""

    def __init__(self, model: torch.nn.Module, loss: Callable):
        super().__init__()
        self.model = model
        self.loss = loss

    def forward(self, batch):
        return self.loss(batch)


def fit(run: Run, cfg: Config, steps: int, out_dir: str, *, seed: int, lr: float = None) -> dict:
    """Train ``run`` for ``steps`` optimizer steps (or continue it, with ``cfg.resume``); returns
    its final evaluation. Checkpoints go to ``out_dir/<run.name>/checkpoint.pt`` every
    ``cfg.ckpt_every`` steps and at the end; metrics to ``out_dir/metrics.jsonl``. Under
    ``torchrun`` every rank samples its own batches (seed + rank) and the run's modules train under
    ``torch.nn.parallel.DistributedDataParallel``: its backward averages the gradients over the
    ranks, once a step (``no_sync()`` on the other micro-batches); rank 0 writes."""
    os.makedirs(out_dir, exist_ok=True)
    run_dir = os.path.join(out_dir, run.name)
    ckpt = os.path.join(run_dir, "checkpoint.pt")
    metrics = os.path.join(out_dir, "metrics.jsonl")
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
            raise RuntimeError(f"{ckpt!r} was written by {len(state['rng'])} processes; resume it with as many "
                               f"(this run has {dist.world()})")
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
        if main:
            save_checkpoint(ckpt, {"model": run.model.state_dict(), "optimizer": opt.state_dict(),
                                   "scheduler": sched.state_dict(), "step": step, "rng": rngs,
                                   "config": cfg.to_dict(), "run": run.name, "world_size": dist.world()})
        dist.barrier()

    def log(record):
        if main:
            _append(metrics, record)

    step_module = _Step(run.model, run.loss)
    ddp = dist.world() > 1
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
            sync = step_module.no_sync() if ddp and micro < cfg.grad_accum - 1 else contextlib.nullcontext()
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
            run.model.eval()
            with torch.no_grad():
                final = run.evaluate()
            log({"run": run.name, "step": step, "eval": final})
            run.model.train()
        if step % cfg.ckpt_every == 0 or step == steps:
            checkpoint()
        bar.update(1)
        bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{sched.get_last_lr()[0]:.2e}", refresh=False)
    bar.close()
    run.model.eval()
    if final is None:  # resumed from the last checkpoint: nothing left to train
        with torch.no_grad():
            final = run.evaluate()
    return final
