"""The trainer (kdkernels distill): config parsing, a short run of the vision task end to end,
bit-for-bit resume after an interruption, atomic and corrupt checkpoints, clear errors."""

import json
import os

import pytest
import torch

from kdkernels import cli
from kdkernels.train import checkpoint as ckpt
from kdkernels.train.cli import main as distill
from kdkernels.train.config import Config, ConfigError, load_file, parse_args
from kdkernels.train.loop import Run, fit, read_metrics

sklearn = pytest.importorskip("sklearn", reason="--task vision needs scikit-learn")

SHORT = ["--steps", "20", "--teacher-steps", "20", "--eval-every", "10", "--ckpt-every", "10", "--no-progress"]


# ------------------------------------------------------------------ config

def test_config_defaults_file_and_flags(tmp_path):
    assert parse_args([]) == Config()
    toml = tmp_path / "c.toml"
    toml.write_text('steps = 33\nlr = "2e-3"\nbaseline = false\nhint_kind = "cosine"\n')
    cfg = parse_args(["--config", str(toml), "--steps", "44", "--baseline"])
    assert (cfg.steps, cfg.lr, cfg.baseline, cfg.hint_kind) == (44, 2e-3, True, "cosine")  # flags win over the file
    yaml = tmp_path / "c.yaml"
    yaml.write_text("temperature: 3\nresume: yes\n")
    assert load_file(str(yaml)) == {"temperature": 3.0, "resume": True}


@pytest.mark.parametrize("content,ext,match", [
    ("stpes = 3\n", ".toml", "unknown config key 'stpes' in .*did you mean 'steps'"),
    ("steps = 2.5\n", ".toml", "steps must be a int"),
    ("steps = [\n", ".toml", "could not be parsed"),
    ("- 1\n- 2\n", ".yaml", "must hold a table of keys"),
    ("steps = 3\n", ".ini", "expected .toml, .yaml or .yml"),
])
def test_config_file_errors(tmp_path, content, ext, match):
    path = tmp_path / ("c" + ext)
    path.write_text(content)
    with pytest.raises(ConfigError, match=match):
        parse_args(["--config", str(path)])


def test_config_flag_errors():
    with pytest.raises(ConfigError, match="unknown config key 'temprature' in the command line; did you mean"):
        parse_args(["--temprature", "2"])
    with pytest.raises(ConfigError, match="alpha must be in"):
        parse_args(["--alpha", "2"])
    with pytest.raises(ConfigError, match="task must be one of"):
        parse_args(["--task", "speech"])
    with pytest.raises(ConfigError, match="does not exist"):
        parse_args(["--config", "/nonexistent/c.toml"])


# ------------------------------------------------------------------ end to end

def test_vision_short_run(tmp_path, capsys):
    out = tmp_path / "run"
    assert distill(SHORT + ["--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| teacher |" in printed and "| student, distilled |" in printed and "| student, alone |" in printed
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["results"]) == {"teacher", "student, distilled", "student, alone"}
    for row in summary["results"].values():
        assert 0.0 <= row["accuracy"] <= 1.0
    metrics = read_metrics(str(out / "metrics.jsonl"))
    runs = {m["run"] for m in metrics}
    assert runs == {"teacher", "student-distilled", "student-alone"}
    steps = [m["step"] for m in metrics if m["run"] == "student-distilled" and "loss" in m]
    assert steps == list(range(1, 21))
    assert any("hint" in m for m in metrics) and any("eval" in m for m in metrics)
    for run in runs:
        assert ckpt.load_checkpoint(str(out / run / "checkpoint.pt"))["step"] == 20
    # a second invocation reuses the cached teacher
    assert distill(SHORT + ["--out", str(out), "--no-baseline"]) == 0
    assert "teacher cached" in capsys.readouterr().out


def test_console_script_dispatch(capsys):
    assert cli.main(["--help"]) == 0
    assert "distill" in capsys.readouterr().out
    assert cli.main(["train"]) == 2


# ------------------------------------------------------------------ resume

class _Interrupt(Exception):
    pass


def _run(seed_model=0, stop_after=None):
    torch.manual_seed(seed_model)
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Dropout(0.2), torch.nn.Linear(16, 3))
    data_x, data_y = torch.randn(64, 6, generator=torch.Generator().manual_seed(5)), torch.arange(64) % 3
    calls = {"n": 0}

    def loss(batch):
        calls["n"] += 1
        if stop_after is not None and calls["n"] > stop_after:
            raise _Interrupt
        x, y = batch
        out = torch.nn.functional.cross_entropy(model(x), y)
        return out, {"ce": float(out.detach())}

    def sample(gen, bs):
        idx = torch.randint(64, (bs,), generator=gen)
        return data_x[idx], data_y[idx]

    return model, Run("r", model, loss, sample, lambda: {"acc": 0.0})


def test_resume_is_bit_for_bit(tmp_path):
    """Interrupted after 13 of 20 steps (checkpoints every 5, 2 micro-batches per step, dropout
    drawing from torch's RNG), then resumed: the same weights as an uninterrupted run."""
    cfg = Config(steps=20, ckpt_every=5, eval_every=100, grad_accum=2, batch_size=8, progress=False, warmup=3)
    ref_model, run = _run()
    fit(run, cfg, 20, str(tmp_path / "a"), seed=7)
    torch.manual_seed(123)  # whatever the RNG holds before the interrupted run
    model, run = _run(stop_after=27)
    with pytest.raises(_Interrupt):
        fit(run, cfg, 20, str(tmp_path / "b"), seed=7)
    assert ckpt.load_checkpoint(str(tmp_path / "b" / "r" / "checkpoint.pt"))["step"] == 10
    torch.manual_seed(456)
    model, run = _run(seed_model=99)  # different initial weights: everything must come from the checkpoint
    fit(run, Config(**{**cfg.to_dict(), "resume": True}), 20, str(tmp_path / "b"), seed=7)
    for (k, a), (_, b) in zip(ref_model.state_dict().items(), model.state_dict().items()):
        assert torch.equal(a, b), k
    steps = [m["step"] for m in read_metrics(str(tmp_path / "b" / "metrics.jsonl")) if "loss" in m]
    assert steps == list(range(1, 21))  # the steps after the checkpoint are not logged twice


# ------------------------------------------------------------------ checkpoints

def test_corrupt_checkpoint(tmp_path, capsys):
    path = tmp_path / "c.pt"
    ckpt.save_checkpoint(str(path), {"step": 3})
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # truncated
    with pytest.raises(ckpt.CheckpointError, match="corrupt or truncated"):
        ckpt.load_checkpoint(str(path))
    with pytest.raises(ckpt.CheckpointError, match="no checkpoint at"):
        ckpt.load_checkpoint(str(tmp_path / "missing.pt"))
    torch.save({"weights": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(ckpt.CheckpointError, match="not a kdkernels training checkpoint"):
        ckpt.load_checkpoint(str(tmp_path / "other.pt"))
    # through the command: a corrupt student checkpoint with --resume is reported, exit code 2
    out = tmp_path / "run"
    (out / "teacher").mkdir(parents=True)
    (out / "teacher" / "checkpoint.pt").write_bytes(b"not a checkpoint")
    assert distill(SHORT + ["--out", str(out), "--resume"]) == 2
    assert "corrupt or truncated" in capsys.readouterr().err


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "c.pt"
    ckpt.save_checkpoint(str(path), {"step": 1})

    def broken_save(obj, f):
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        ckpt.save_checkpoint(str(path), {"step": 2})
    monkeypatch.undo()
    assert ckpt.load_checkpoint(str(path))["step"] == 1  # the previous checkpoint is intact
    assert os.listdir(tmp_path) == ["c.pt"]  # no temporary file left behind


def test_clear_errors(tmp_path, capsys):
    blocked = tmp_path / "file"
    blocked.write_text("x")
    assert distill(["--out", str(blocked / "sub")] + SHORT) == 2
    assert "is not writable" in capsys.readouterr().err
    bad_teacher = tmp_path / "teacher.pt"
    torch.save({"w": torch.zeros(3)}, bad_teacher)
    assert distill(SHORT + ["--out", str(tmp_path / "r"), "--teacher", str(bad_teacher)]) == 2
    assert "does not fit the vision teacher" in capsys.readouterr().err


# ------------------------------------------------------------------ data-parallel (gloo, 2 processes)

def _free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank, world, init_file, out_dir):
    import torch.distributed as tdist

    tdist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    cfg = Config(steps=12, ckpt_every=6, eval_every=100, batch_size=8, progress=False, warmup=2)
    model, run = _run()
    fit(run, cfg, 12, os.path.join(out_dir, "fit"), seed=3)
    torch.save(model.state_dict(), os.path.join(out_dir, f"rank{rank}.pt"))
    tdist.destroy_process_group()


@pytest.mark.skipif(not torch.distributed.is_available(), reason="needs torch.distributed with gloo")
def test_two_processes_stay_in_sync(tmp_path):
    """Each rank samples its own batches; the averaged gradients keep the weights identical, and the
    checkpoint holds both ranks' RNG and sampler states."""
    import torch.multiprocessing as mp

    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    a, b = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))
    for k in a:
        assert torch.equal(a[k], b[k]), k
    state = ckpt.load_checkpoint(str(tmp_path / "fit" / "r" / "checkpoint.pt"))
    assert state["world_size"] == 2 and len(state["rng"]) == 2
    assert not torch.equal(state["rng"][0]["sampler"], state["rng"][1]["sampler"])
    single, run = _run()
    fit(run, Config(steps=12, ckpt_every=6, eval_every=100, batch_size=8, progress=False, warmup=2), 12,
        str(tmp_path / "single"), seed=3)
    assert not torch.equal(single.state_dict()["0.weight"], a["0.weight"])  # 2 ranks saw other batches


@pytest.mark.skipif(not torch.distributed.is_available(), reason="needs torch.distributed with gloo")
def test_torchrun_two_processes(tmp_path):
    """`torchrun --nproc_per_node=2 -m kdkernels.train` on the CPU: one table, one set of metrics."""
    import subprocess
    import sys

    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={_free_port()}",
           "-m", "kdkernels.train", *SHORT, "--no-baseline", "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.count("| student, distilled |") == 1  # rank 0 prints
    assert "x 2 processes" in res.stdout
    assert json.loads((out / "summary.json").read_text())["processes"] == 2
    steps = [m["step"] for m in read_metrics(str(out / "metrics.jsonl")) if m["run"] == "student-distilled" and "loss" in m]
    assert steps == list(range(1, 21))


# ------------------------------------------------------------------ outputs, plot

def test_outputs_of_any_model():
    from types import SimpleNamespace

    from kdkernels.train.outputs import hidden_of, logits_of

    x, h1, h2 = torch.randn(2, 3), torch.randn(2, 4), torch.randn(2, 5)
    assert logits_of(x) is x
    assert logits_of((x, (h1, h2))) is x and hidden_of((x, (h1, h2))) is h2
    assert logits_of({"logits": x}) is x and hidden_of({"logits": x, "hidden_states": (h1, h2)}, 0) is h1
    hf = SimpleNamespace(logits=x, hidden_states=None, last_hidden_state=h2)
    assert logits_of(hf) is x and hidden_of(hf) is h2 and hidden_of(hf, 0) is None
    with pytest.raises(TypeError, match="cannot find logits"):
        logits_of(SimpleNamespace(scores=x))


def test_curves_png(tmp_path):
    pytest.importorskip("matplotlib")
    from kdkernels.train.plot import plot_metrics

    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in [
        {"run": "a", "step": 1, "loss": 2.0, "lr": 1e-3}, {"run": "a", "step": 2, "loss": 1.0, "lr": 1e-3},
        {"run": "a", "step": 2, "eval": {"accuracy": 0.5}}, {"run": "b", "step": 1, "loss": 3.0, "lr": 1e-3}]))
    assert plot_metrics(str(path), str(tmp_path / "c.png"))
    assert (tmp_path / "c.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ------------------------------------------------------------------ lm

LM_SHORT = ["--task", "lm", "--steps", "20", "--teacher-steps", "20", "--eval-every", "10", "--ckpt-every", "10",
            "--no-progress", "--corpus-bytes", "200000", "--vocab-size", "600", "--context", "16", "--batch-size", "4",
            "--teacher-dim", "32", "--student-dim", "16"]


def test_lm_short_run(tmp_path, capsys):
    pytest.importorskip("tokenizers")
    out = tmp_path / "lm"
    assert distill(LM_SHORT + ["--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "held-out perplexity" in printed and "fused_linear_kl" in printed
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["results"]) == {"teacher", "student, distilled", "student, alone"}
    for row in summary["results"].values():
        assert 1.0 < row["perplexity"] < 600 * 1.5  # better than uniform at worst by a margin, after 20 steps
    assert (out / "tokenizer-600.json").exists()
    metrics = read_metrics(str(out / "metrics.jsonl"))
    assert any("hint" in m for m in metrics if m["run"] == "student-distilled")


def test_lm_task_defaults_and_overrides():
    cfg = parse_args(["--task", "lm"])
    assert (cfg.temperature, cfg.steps, cfg.teacher_lr) == (1.0, 300, 3e-3)  # the lm defaults
    assert parse_args(["--task", "lm", "--temperature", "2"]).temperature == 2.0  # a flag wins over them
    assert parse_args([]).temperature == 4.0  # vision's
    with pytest.raises(ConfigError, match="vocab_size must be >= 260"):
        parse_args(["--task", "lm", "--vocab-size", "100"])
