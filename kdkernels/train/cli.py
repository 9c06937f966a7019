"""``kdkernels distill`` / ``python -m kdkernels.train``: run a task and print the table."""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time

import torch

from kdkernels.train import dist
from kdkernels.train.checkpoint import CheckpointError
from kdkernels.train.config import ConfigError, config_of, parse_args

__all__ = ["main"]


def _device(cfg) -> torch.device:
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device=cuda but torch sees no CUDA device")
    if cfg.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(cfg.device)


def _writable(out: str) -> str:
    out = os.path.abspath(out)
    try:
        os.makedirs(out, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out):
            pass
    except OSError as exc:
        raise ConfigError(f"output directory {out!r} is not writable: {exc.strerror or exc}") from None
    return out


def _claim(out: str, task: str) -> None:
    """One task per output directory: its runs' checkpoints ("teacher", "student-distilled", ...)
    and metrics.jsonl share names across tasks, so a directory that holds another task's run is
    refused rather than mixed. The task is recorded in ``out/task``."""
    marker = os.path.join(out, "task")
    try:
        with open(marker) as f:
            other = f.read().strip()
    except OSError:
        other = ""
    if other and other != task:
        raise ConfigError(f"output directory {out!r} holds a --task {other} run; pass another --out for --task {task}")
    if dist.is_main() and other != task:
        with open(marker, "w") as f:
            f.write(task + "\n")


def format_table(rows, metrics=("accuracy", "loss")) -> str:
    lines = ["| model | " + " | ".join(f"held-out {m}" for m in metrics) + " |",
             "|---|" + "---:|" * len(metrics)]
    for name, values in rows:
        lines.append(f"| {name} | " + " | ".join(f"{values[m]:.4f}" for m in metrics) + " |")
    return "\n".join(lines)


def main(argv=None, prog: str = "kdkernels distill", parsed=None) -> int:
    """Run ``argv``, or ``parsed``: the (parser, namespace, unparsed rest) of the ``kdkernels``
    command's ``distill`` subparser."""
    try:
        cfg = config_of(*parsed) if parsed is not None else parse_args(argv, prog=prog)
        device = _device(cfg)
        out = _writable(cfg.out)
        dist.setup(device)
        if cfg.fsdp and dist.world() == 1:
            print(f"{prog}: note: --fsdp shards over the processes of torchrun; this single process trains "
                  "unsharded", file=sys.stderr)
        _claim(out, cfg.task)
        torch.manual_seed(cfg.seed)
        t0 = time.perf_counter()
        if cfg.task == "vision":
            from kdkernels.train.vision import run_task
        elif cfg.task == "embeddings":
            from kdkernels.train.embeddings import run_task
        elif cfg.task == "hf":
            from kdkernels.train.hf import run_task
        else:
            from kdkernels.train.lm import run_task
        result = run_task(cfg, device, out)
    except (ConfigError, CheckpointError) as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        dist.teardown()
        return 2
    seconds = time.perf_counter() - t0
    main_rank = dist.is_main()
    world = dist.world()
    dist.teardown()
    if not main_rank:
        return 0
    table = format_table(result["rows"], result.get("metrics", ("accuracy", "loss")))
    summary = {"task": cfg.task, "device": str(device), "processes": world, "seconds": round(seconds, 1),
               "config": cfg.to_dict(),
               "results": {name: values for name, values in result["rows"]}, "notes": result["notes"]}
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    procs = (f" x {world} processes" + (" (FSDP2)" if cfg.fsdp else "")) if world > 1 else ""
    print(f"\nkdkernels distill --task {cfg.task}: {seconds:.0f} s on {device}{procs}; " + "; ".join(result["notes"]))
    print(table)
    from kdkernels.train.plot import plot_metrics

    png = os.path.join(out, "curves.png")
    plotted = plot_metrics(os.path.join(out, "metrics.jsonl"), png)
    print(f"\nmetrics: {os.path.join(out, 'metrics.jsonl')}; checkpoints: {out}/<run>/checkpoint.pt; "
          + (f"curves: {png}" if plotted else "curves: pip install matplotlib for curves.png"))
    return 0
