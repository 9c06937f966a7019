"""Reading a model's forward output without knowing its type: a tensor (the logits), a tuple or
list (logits first), a dict, or an object with attributes, as Hugging Face models return
(``.logits``, ``.hidden_states``, ``.last_hidden_state``). Nothing here imports transformers."""

from __future__ import annotations

from typing import Any, Optional

import torch

__all__ = ["logits_of", "hidden_of"]


def _get(out: Any, name: str):
    if isinstance(out, dict):
        return out.get(name)
    return getattr(out, name, None)


def logits_of(out: Any) -> torch.Tensor:
    """The logits of a forward output."""
    if isinstance(out, torch.Tensor):
        return out
    value = _get(out, "logits")
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise TypeError(f"cannot find logits in a {type(out).__name__}: return a tensor, a tuple with the logits first, "
                    "or an object / dict with .logits")


def hidden_of(out: Any, layer: int = -1) -> Optional[torch.Tensor]:
    """Hidden states of ``layer`` (``.hidden_states[layer]``; ``.last_hidden_state`` for -1), or None."""
    states = _get(out, "hidden_states")
    if isinstance(states, (tuple, list)) and states:
        return states[layer]
    if isinstance(states, torch.Tensor):
        return states
    if layer == -1:
        last = _get(out, "last_hidden_state")
        if isinstance(last, torch.Tensor):
            return last
    if isinstance(out, (tuple, list)) and len(out) > 1 and isinstance(out[1], (tuple, list)) and out[1]:
        return out[1][layer]
    return None
