"""``kdkernels distill --task hf``: distill one Hugging Face causal LM checkpoint into another.

``--teacher DIR --student DIR`` are directories written by ``save_pretrained`` (``config.json``
and the weights); ``--data FILE`` is a text file, or JSONL with a ``text`` field per line. The
text is tokenized with the student's tokenizer (from its directory), each document ended by its
EOS token, concatenated and packed into blocks of ``--max-length`` tokens; the last tenth of the
blocks (at least one) is held out. The student is trained with the shared loop
(:mod:`kdkernels.train.loop`) on :func:`kdkernels.integrations.hf.distillation_loss` (the fused
loss on both models' final hidden states: no ``[tokens, vocab]`` logits), with ``--baseline`` a
second copy on its own cross-entropy; the table gives the held-out perplexity of the teacher and
of both students, and the distilled student is saved with ``save_pretrained`` (with the
tokenizer) in ``OUT/student-distilled-hf``. Nothing is downloaded: every load is
``local_files_only``, and a path that is not what this task takes is a one-line error.
"""

from __future__ import annotations

import json
import math
import os

import torch

from kdkernels.train.config import ConfigError
from kdkernels.train.loop import Run, fit, full_state_dict, is_sharded

__all__ = ["run_task", "read_texts", "pack"]


def _transformers():
    try:
        import transformers
    except ImportError:
        raise ConfigError('--task hf needs transformers: pip install "kdkernels[hf]"') from None
    return transformers


def checkpoint_dir(path: str, flag: str) -> str:
    """``path`` if it is a directory written by ``save_pretrained``, else a ConfigError that says
    what was expected (the user's file is never called corrupt for being of another kind)."""
    if not path:
        raise ConfigError(f"--task hf needs {flag} DIR: a directory written by save_pretrained")
    if not os.path.exists(path):
        raise ConfigError(f"{flag} {path!r} does not exist (expected a directory written by save_pretrained)")
    if not os.path.isdir(path):
        raise ConfigError(f"{flag} {path!r} is a file; --task hf takes the directory save_pretrained wrote "
                          "(config.json and the weights), not a weights file")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise ConfigError(f"{flag} {path!r} has no config.json: not a directory written by save_pretrained")
    return path


def _load_model(path: str, flag: str, device):
    tf = _transformers()
    try:
        model = tf.AutoModelForCausalLM.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, KeyError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"{flag} {path!r} could not be loaded as a causal LM: {first}") from None
    return model.float().to(device)


def read_texts(path: str) -> list:
    """The documents of ``path``: one per JSONL line (its ``text`` field), or the whole text file."""
    if not path:
        raise ConfigError("--task hf needs --data FILE: a text file, or JSONL with a 'text' field per line")
    if not os.path.isfile(path):
        raise ConfigError(f"--data {path!r} does not exist (a text file, or JSONL with a 'text' field per line)")
    with open(path, encoding="utf-8") as f:
        raw = f.read()
    if not path.endswith((".jsonl", ".json")):
        return [raw] if raw.strip() else []
    texts = []
    for n, line in enumerate(raw.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            raise ConfigError(f"--data {path!r} line {n} is not JSON (JSONL: one object with a 'text' field a "
                              "line)") from None
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise ConfigError(f"--data {path!r} line {n} has no string 'text' field")
        texts.append(record["text"])
    return texts


def pack(token_lists: list, length: int) -> torch.Tensor:
    """``[blocks, length]`` of the concatenated documents (the remainder past the last whole block dropped)."""
    flat = torch.tensor([t for ids in token_lists for t in ids], dtype=torch.long)
    blocks = flat.numel() // length
    return flat[: blocks * length].view(blocks, length)


def _perplexity(model, held: torch.Tensor, device, batch: int) -> dict:
    """exp of the mean next-token cross-entropy over the held-out blocks (the model's own loss)."""
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(held), batch):
            x = held[i:i + batch].to(device)
            n = x.numel() - x.shape[0]  # predicted tokens: every position but the first of a block
            total += float(model(input_ids=x, labels=x).loss) * n
            count += n
    loss = total / max(count, 1)
    return {"perplexity": math.exp(min(loss, 80.0)), "loss": loss}


def run_task(cfg, device, out_dir) -> dict:
    from kdkernels.integrations.hf import distillation_loss, lm_head_of

    tf = _transformers()
    if not cfg.progress:
        tf.utils.logging.disable_progress_bar()
    teacher_dir = checkpoint_dir(cfg.teacher, "--teacher")
    student_dir = checkpoint_dir(cfg.student, "--student")
    texts = read_texts(cfg.data)
    try:
        tok = tf.AutoTokenizer.from_pretrained(student_dir, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"--student {student_dir!r} has no tokenizer that loads ({str(exc).splitlines()[0]}): "
                          "the data is tokenized with the student's tokenizer, saved beside it") from None
    eos = [tok.eos_token_id] if tok.eos_token_id is not None else []
    blocks = pack([tok(t)["input_ids"] + eos for t in texts], cfg.max_length)
    if len(blocks) < 2:
        raise ConfigError(f"--data {cfg.data!r} gives {len(blocks)} block(s) of --max-length {cfg.max_length} "
                          "tokens; it needs at least 2 (training and held out)")
    n_held = max(1, len(blocks) // 10)
    train, held = blocks[:-n_held], blocks[-n_held:]

    teacher = _load_model(teacher_dir, "--teacher", device)
    teacher.eval().requires_grad_(False)
    student = _load_model(student_dir, "--student", device)
    vs, vt = lm_head_of(student).weight.shape[0], lm_head_of(teacher).weight.shape[0]
    shared = min(vs, vt)
    if int(blocks.max()) >= shared:
        raise ConfigError(f"the student's tokenizer gives token {int(blocks.max())}, past the vocabulary the two "
                          f"models share ({shared})")
    rows = [("teacher", _perplexity(teacher, held, device, cfg.batch_size))]

    def sampler(gen, batch):
        idx = torch.randint(0, len(train), (batch,), generator=gen)
        return {"input_ids": train[idx].to(device)}

    def distill(batch):
        loss = distillation_loss(student, teacher, batch, temperature=cfg.temperature, alpha=cfg.alpha,
                                 vocab_size=shared if vs != vt else None)
        return loss, {"distill": float(loss.detach())}

    rows.append(("student, distilled", fit(Run("student-distilled", student, distill, sampler,
                                                lambda: _perplexity(student, held, device, cfg.batch_size)),
                                            cfg, cfg.steps, out_dir, seed=cfg.seed + 3)))
    saved = os.path.join(out_dir, "student-distilled-hf")
    from kdkernels.train import dist

    # with --fsdp the student's weights are shards: gathered whole (on every rank) for rank 0 to save
    whole = {"state_dict": full_state_dict(student)} if is_sharded(student) else {}
    if dist.is_main():
        student.save_pretrained(saved, **whole)
        tok.save_pretrained(saved)
    if cfg.baseline:
        alone = _load_model(student_dir, "--student", device)

        def ce(batch):
            x = batch["input_ids"]
            loss = alone(input_ids=x, labels=x).loss
            return loss, {"ce": float(loss.detach())}

        rows.append(("student, alone", fit(Run("student-alone", alone, ce, sampler,
                                               lambda: _perplexity(alone, held, device, cfg.batch_size)),
                                           cfg, cfg.steps, out_dir, seed=cfg.seed + 3)))
    n_t = sum(p.numel() for p in teacher.parameters())
    n_s = sum(p.numel() for p in student.parameters())
    notes = [f"teacher {teacher_dir} ({type(teacher).__name__}, {n_t / 1e6:.2f} M parameters, vocabulary {vt}); "
             f"student {student_dir} ({type(student).__name__}, {n_s / 1e6:.2f} M, vocabulary {vs})"
             + (f", {shared} shared" if vs != vt else ""),
             f"{len(texts)} documents, {len(train)} training and {len(held)} held-out blocks of {cfg.max_length} "
             f"tokens; the distilled student saved in {saved}"]
    return {"rows": rows, "notes": notes, "metrics": ("perplexity", "loss")}
