"""``--task vision``: scikit-learn's bundled digits (1797 images of 8 x 8 pixels, 10 classes, on
disk with scikit-learn), a CNN teacher, a small CNN student.

Three runs on the same split (1437 training images, 360 held out): the teacher (cross-entropy;
trained once and cached in ``out/teacher``), the student distilled from it (Hinton's
``kdkernels.distill_loss``: ``alpha`` cross-entropy plus ``(1 - alpha) T²`` KL at temperature ``T``,
and a ``kdkernels.nn.HintLoss`` from the student's penultimate features to the teacher's), and the
same student trained alone (cross-entropy). Reported: held-out accuracy and loss of each.
"""

from __future__ import annotations

import os
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn

import kdkernels
from kdkernels.train.checkpoint import CheckpointError, load_checkpoint, model_state
from kdkernels.train.loop import Run, fit, unsharded
from kdkernels.train.outputs import hidden_of, logits_of

__all__ = ["Teacher", "Student", "load_digits", "run_task"]


def load_digits(seed: int = 0):
    """(train images, train labels, test images, test labels): float32 [n, 1, 8, 8] in [0, 1]."""
    try:
        from sklearn.datasets import load_digits as sk_digits
    except ImportError:
        raise RuntimeError("--task vision needs scikit-learn (pip install scikit-learn): its digits ship with it") \
            from None
    d = sk_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(d.target, dtype=torch.long)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(1234 + seed))
    test, train = perm[:360], perm[360:]
    return x[train], y[train], x[test], y[test]


class Teacher(nn.Module):
    """conv 32 → conv 64 → pool → 256 features → 10 logits; returns ``.logits`` and ``.hidden_states``."""

    feature_dim = 256

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3, padding=1)
        self.conv2 = nn.Conv2d(32, 64, 3, padding=1)
        self.fc = nn.Linear(64 * 4 * 4, self.feature_dim)
        self.head = nn.Linear(self.feature_dim, 10)

    def forward(self, x):
        h = F.max_pool2d(F.relu(self.conv2(F.relu(self.conv1(x)))), 2)
        feat = F.relu(self.fc(h.flatten(1)))
        return SimpleNamespace(logits=self.head(feat), hidden_states=(feat,))


class Student(nn.Module):
    """conv 4 → pool → 16 features → 10 logits (about 1.4 k parameters)."""

    feature_dim = 16

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 4 * 4, self.feature_dim)
        self.head = nn.Linear(self.feature_dim, 10)

    def forward(self, x):
        feat = F.relu(self.fc(F.max_pool2d(F.relu(self.conv(x)), 2).flatten(1)))
        return SimpleNamespace(logits=self.head(feat), hidden_states=(feat,))


def _evaluate(model, x, y):
    def evaluate():
        logits = logits_of(model(x))
        return {"accuracy": float((logits.argmax(1) == y).float().mean()), "loss": float(F.cross_entropy(logits, y))}

    return evaluate


def _sampler(x, y, device):
    def sample(gen, batch_size):
        idx = torch.randint(len(y), (batch_size,), generator=gen)
        return x[idx].to(device), y[idx].to(device)

    return sample


def _teacher(cfg, data, device, out_dir):
    xtr, ytr, xte, yte = data
    teacher = Teacher().to(device)
    if cfg.teacher:
        state = model_state(cfg.teacher)  # a missing or corrupt file raises its own CheckpointError
        try:
            teacher.load_state_dict(state)
        except RuntimeError as exc:  # missing / unexpected keys, wrong shapes
            raise CheckpointError(f"teacher checkpoint {cfg.teacher!r} does not fit the vision teacher: {exc}") \
                from None
        return teacher, "given"
    cached = os.path.join(out_dir, "teacher", "checkpoint.pt")
    if os.path.exists(cached):
        state = load_checkpoint(cached)
        if state.get("step") == cfg.teacher_steps:
            teacher.load_state_dict(model_state(cached, state))
            return teacher, "cached"
    torch.manual_seed(cfg.seed)
    teacher = Teacher().to(device)

    def loss(batch):
        x, y = batch
        ce = F.cross_entropy(logits_of(teacher(x)), y)
        return ce, {"ce": float(ce.detach())}

    fit(Run("teacher", teacher, loss, _sampler(xtr, ytr, device), _evaluate(teacher, xte.to(device), yte.to(device))),
        cfg, cfg.teacher_steps, out_dir, seed=cfg.seed + 1, lr=cfg.teacher_lr)
    return unsharded(teacher, lambda: Teacher().to(device)), "trained"  # gathered, when --fsdp sharded it


def run_task(cfg, device, out_dir) -> dict:
    """Train (or load) the teacher, the distilled student and the student alone; returns
    ``{"rows": [(name, {metric: value})], "notes": [...]}``."""
    data = load_digits(cfg.seed)
    xtr, ytr, xte, yte = data
    xte_d, yte_d = xte.to(device), yte.to(device)
    teacher, how = _teacher(cfg, data, device, out_dir)
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    rows = [("teacher", _evaluate(teacher, xte_d, yte_d)())]
    if 0 < cfg.student_examples < len(ytr):  # the students' transfer set: the first examples of the split
        xtr, ytr = xtr[:cfg.student_examples], ytr[:cfg.student_examples]

    torch.manual_seed(cfg.seed + 2)
    student = Student().to(device)
    hint = kdkernels.nn.HintLoss(Student.feature_dim, Teacher.feature_dim, metric=cfg.hint_kind).to(device)
    model = nn.ModuleDict({"student": student, "hint": hint})

    def distill(batch):
        x, y = batch
        with torch.no_grad():
            t = teacher(x)
        s = student(x)
        kd = kdkernels.distill_loss(logits_of(s), logits_of(t), y, temperature=cfg.temperature, alpha=cfg.alpha)
        total, logs = kd, {"distill": float(kd.detach())}
        if cfg.hint_weight > 0:
            h = hint(hidden_of(s), hidden_of(t))
            total = total + cfg.hint_weight * h
            logs["hint"] = float(h.detach())
        return total, logs

    rows.append(("student, distilled", fit(Run("student-distilled", model, distill, _sampler(xtr, ytr, device),
                                                _evaluate(student, xte_d, yte_d)), cfg, cfg.steps, out_dir,
                                            seed=cfg.seed + 3)))
    if cfg.baseline:
        torch.manual_seed(cfg.seed + 2)  # the same initial student
        alone = Student().to(device)

        def ce(batch):
            x, y = batch
            loss = F.cross_entropy(logits_of(alone(x)), y)
            return loss, {"ce": float(loss.detach())}

        rows.append(("student, alone", fit(Run("student-alone", alone, ce, _sampler(xtr, ytr, device),
                                                _evaluate(alone, xte_d, yte_d)), cfg, cfg.steps, out_dir,
                                            seed=cfg.seed + 3)))
    notes = [f"teacher {how} on {len(data[1])} digits, students on {len(ytr)}, {len(yte)} held out; teacher "
             f"{sum(p.numel() for p in teacher.parameters())} parameters, student "
             f"{sum(p.numel() for p in student.parameters())}"]
    return {"rows": rows, "notes": notes, "metrics": ("accuracy", "loss")}
