"""``kdkernels distill --task hf`` end to end on checkpoints this test writes with save_pretrained
(tiny random Llama models, a word-level tokenizer built here; nothing is downloaded), and the
one-line errors for paths that are not what a task takes."""

import json
import os
import random

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from kdkernels.train.cli import main  # noqa: E402

WORDS = ("the a cat dog bird sees eats likes runs sleeps on under near big small red green quickly slowly and "
         "then house tree river stone").split()


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {w: i for i, w in enumerate(["<pad>", "<unk>", "</s>", *WORDS])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", unk_token="<unk>",
                                                pad_token="<pad>")


def _llama(vocab, hidden, layers):
    cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                                   num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                                   max_position_embeddings=64)
    return transformers.LlamaForCausalLM(cfg)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """teacher/ (vocabulary padded by 8), student/ (with the tokenizer) and data.jsonl."""
    root = tmp_path_factory.mktemp("hf")
    torch.manual_seed(0)
    tok = _tokenizer()
    n = len(tok)
    _llama(n + 8, 48, 2).save_pretrained(root / "teacher")
    _llama(n, 32, 1).save_pretrained(root / "student")
    tok.save_pretrained(root / "student")
    rng = random.Random(0)
    with open(root / "data.jsonl", "w") as f:
        for _ in range(120):
            f.write(json.dumps({"text": " ".join(rng.choice(WORDS) for _ in range(rng.randrange(6, 20)))}) + "\n")
    return root


def test_distill_hf_end_to_end(checkpoints, tmp_path, capsys):
    out = tmp_path / "run"
    rc = main(["--task", "hf", "--teacher", str(checkpoints / "teacher"), "--student", str(checkpoints / "student"),
               "--data", str(checkpoints / "data.jsonl"), "--out", str(out), "--steps", "4", "--batch-size", "4",
               "--max-length", "16", "--eval-every", "2", "--ckpt-every", "4", "--no-progress"])
    printed = capsys.readouterr()
    assert rc == 0, printed.err
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["results"]) == {"teacher", "student, distilled", "student, alone"}
    for values in summary["results"].values():
        assert values["perplexity"] > 1 and values["loss"] > 0
    assert "held-out perplexity" in printed.out and "shared" in summary["notes"][0]
    saved = out / "student-distilled-hf"
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(saved, local_files_only=True)
    assert isinstance(reloaded, transformers.LlamaForCausalLM)
    assert transformers.AutoTokenizer.from_pretrained(saved, local_files_only=True).eos_token == "</s>"


def _errors(root):
    t, s, d = str(root / "teacher"), str(root / "student"), str(root / "data.jsonl")
    weights = [f for f in os.listdir(root / "teacher") if f.endswith(".safetensors")][0]
    return [
        ("teacher is a weights file", ["--task", "hf", "--teacher", os.path.join(t, weights), "--student", s,
                                       "--data", d], "is a file; --task hf takes the directory"),
        ("teacher missing", ["--task", "hf", "--teacher", t + "-nope", "--student", s, "--data", d], "does not exist"),
        ("no student", ["--task", "hf", "--teacher", t, "--data", d], "needs --student DIR"),
        ("not a save_pretrained dir", ["--task", "hf", "--teacher", str(root), "--student", s, "--data", d],
         "has no config.json"),
        ("student without a tokenizer", ["--task", "hf", "--teacher", t, "--student", t, "--data", d],
         "has no tokenizer"),
        ("data missing", ["--task", "hf", "--teacher", t, "--student", s, "--data", d + ".nope"], "does not exist"),
        ("lm with an hf teacher dir", ["--task", "lm", "--teacher", t], "is a Hugging Face checkpoint"),
        ("lm with a safetensors teacher", ["--teacher", os.path.join(t, weights)], "is a Hugging Face checkpoint"),
        ("student on lm", ["--student", s], "--student is for --task hf"),
    ]


@pytest.mark.parametrize("case", range(9))
def test_distill_errors_are_one_line(checkpoints, tmp_path, capsys, case):
    name, argv, match = _errors(checkpoints)[case]
    rc = main([*argv, "--out", str(tmp_path / "o"), "--steps", "1", "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert rc == 2, (name, err)
    assert match in err and len(err.splitlines()) == 1, (name, err)
    assert "corrupt" not in err, (name, err)


@pytest.mark.skipif(not torch.distributed.is_available(), reason="needs torch.distributed with gloo")
def test_distill_hf_fsdp_two_processes(checkpoints, tmp_path):
    """`torchrun --nproc_per_node=2 -m kdkernels.train --task hf --fsdp`: the student's decoder
    layers and the rest sharded by FSDP2; the student saved with save_pretrained holds the weights
    gathered from the ranks' shards, the same as the sharded checkpoint's."""
    import socket
    import subprocess
    import sys

    from safetensors.torch import load_file

    from kdkernels.train.checkpoint import load_checkpoint, model_state

    out = tmp_path / "run"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}", "-m",
           "kdkernels.train", "--task", "hf", "--fsdp", "--teacher", str(checkpoints / "teacher"), "--student",
           str(checkpoints / "student"), "--data", str(checkpoints / "data.jsonl"), "--out", str(out), "--steps", "4",
           "--batch-size", "2", "--max-length", "16", "--eval-every", "2", "--ckpt-every", "2", "--no-progress",
           "--no-baseline"]
    res = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "x 2 processes (FSDP2)" in res.stdout
    ckpt = str(out / "student-distilled" / "checkpoint.pt")
    assert load_checkpoint(ckpt)["shards"] == "shards-000000004"
    sharded = model_state(ckpt)
    saved = load_file(str(out / "student-distilled-hf" / "model.safetensors"))
    assert saved.keys() == sharded.keys()
    for k in saved:
        assert torch.equal(saved[k], sharded[k]), k
    initial = transformers.AutoModelForCausalLM.from_pretrained(checkpoints / "student", local_files_only=True)
    assert not torch.equal(initial.lm_head.weight, saved["lm_head.weight"])  # trained
