"""Checkpoints that are never half-written: the state goes to a temporary file in the same
directory, is flushed to disk, and is renamed over the checkpoint (an atomic replace on POSIX and
Windows), so a crash or Ctrl-C leaves either the previous checkpoint or the new one.

A checkpoint holds what a run needs to continue bit-for-bit: model, optimizer and scheduler
states, the step, the RNG states (Python, torch CPU, CUDA, and the data sampler's generator) and
the config it was written with. A run sharded with FSDP2 (``--fsdp``) keeps its model and
optimizer states in a ``torch.distributed.checkpoint`` directory beside ``checkpoint.pt``, which
names it (``"shards"``) and is written after it, so the rename still commits the whole checkpoint.
"""

from __future__ import annotations

import os
import random
import tempfile
import warnings
from typing import Optional

import torch

__all__ = ["CheckpointError", "save_checkpoint", "load_checkpoint", "model_state", "rng_state", "set_rng_state"]

FORMAT = "kdkernels-train-checkpoint-1"


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, unreadable or not one of ours."""


def rng_state(sampler: Optional[torch.Generator] = None) -> dict:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    if sampler is not None:
        state["sampler"] = sampler.get_state()
    return state


def set_rng_state(state: dict, sampler: Optional[torch.Generator] = None) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if sampler is not None and "sampler" in state:
        sampler.set_state(state["sampler"])


def save_checkpoint(path: str, state: dict) -> None:
    """Write ``state`` (plus a format tag) to ``path`` atomically."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".pt", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save({"format": FORMAT, **state}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _read(path: str):
    if not os.path.exists(path):
        raise CheckpointError(f"no checkpoint at {path!r}")
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:
        raise CheckpointError(f"checkpoint {path!r} is corrupt or truncated and cannot be loaded "
                              f"({type(exc).__name__}: {exc}); delete it to start over") from None


def load_checkpoint(path: str) -> dict:
    """The state saved at ``path``; :class:`CheckpointError` if there is none or it is corrupt."""
    state = _read(path)
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path!r} is not a kdkernels training checkpoint")
    return state


def _sharded_model_state(directory: str) -> dict:
    """The whole model state of a ``torch.distributed.checkpoint`` directory written by ``fit``
    with ``--fsdp`` (every shard read, in this process alone)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    try:
        meta = dcp.FileSystemReader(directory).read_metadata().state_dict_metadata
    except Exception as exc:
        raise CheckpointError(f"the sharded weights {directory!r} cannot be read ({type(exc).__name__}: {exc})") \
            from None
    state = {k[len("model."):]: torch.empty(m.size, dtype=m.properties.dtype) for k, m in meta.items()
             if k.startswith("model.") and isinstance(m, TensorStorageMetadata)}
    with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load({"model": state}, checkpoint_id=directory, no_dist=True)
    return state


def model_state(path: str, state: Optional[dict] = None) -> dict:
    """A model's state dict from ``path``: a kdkernels training checkpoint (its model, or its
    sharded weights gathered whole) or a plain ``torch.save(model.state_dict())`` file; ``state``
    is the checkpoint when it has been read already."""
    obj = _read(path) if state is None else state
    if isinstance(obj, dict) and obj.get("format") == FORMAT:
        if "shards" in obj:
            return _sharded_model_state(os.path.join(os.path.dirname(os.path.abspath(path)), obj["shards"]))
        return obj["model"]
    if isinstance(obj, dict) and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return obj
    raise CheckpointError(f"{path!r} holds neither a kdkernels training checkpoint nor a model state dict")
