"""The thin trainer behind ``kdkernels distill`` (also ``python -m kdkernels.train``): one command
distills a student from a teacher with the kdkernels losses and compares it, on held-out data,
with the teacher and with the same student trained alone.

``kdkernels.train.loop.fit`` is the loop (AdamW, warm-up and cosine decay, gradient accumulation,
atomic checkpoints, bit-for-bit resume, ``metrics.jsonl``); the tasks build the models, data and
losses. A user with their own loop uses the losses directly.
"""

from kdkernels.train.config import Config, ConfigError, parse_args

__all__ = ["Config", "ConfigError", "parse_args", "main"]


def main(argv=None) -> int:
    from kdkernels.train.cli import main as _main

    return _main(argv)
