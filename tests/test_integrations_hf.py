"""kdkernels.integrations.hf on tiny random models built from configs (nothing is downloaded):
the fused path equals Hugging Face's own logits fed to the float64 reference, loss and every
student gradient, for Llama, Qwen2 and Gemma 2 (soft-capped) heads, tied and untied, with a bias,
with padded vocabularies; the teacher gets no gradient; DistillationTrainer trains and its
gradient accumulation equals the unaccumulated step."""

import pytest
import torch
from conftest import HAS_PEAK_RSS_RESET, assert_close, run_memory_probe

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from kdkernels import reference  # noqa: E402
from kdkernels.integrations.hf import DistillationTrainer, hidden_states_of, lm_head_of  # noqa: E402

V = 2000  # "a few thousand" tokens; the padded teacher has V + 64 (32000 against 32064, scaled down)


def tiny(family, hidden, vocab=V, tie=False, bias=False, layers=1):
    """A float64 causal LM of the family with random weights."""
    common = dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=tie,
                  attn_implementation="eager")
    if family == "llama":
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**common))
    elif family == "qwen2":
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**common))
    elif family == "gemma2":
        cfg = transformers.Gemma2Config(**common, head_dim=hidden // 4, final_logit_softcapping=3.0)
        model = transformers.Gemma2ForCausalLM(cfg)
    else:
        raise ValueError(family)
    if bias:
        model.lm_head = torch.nn.Linear(hidden, vocab, bias=True)
        torch.nn.init.normal_(model.lm_head.bias, std=0.5)
    return model.double()


def batch(vocab=V, rows=3, seq=10):
    ids = torch.randint(0, vocab, (rows, seq))
    labels = ids.clone()
    labels[0, 2:5] = -100
    labels[2, 7] = -100
    return ids, labels


CASES = [("llama", {}), ("llama", {"tie": True}), ("llama", {"bias": True}), ("qwen2", {}),
         ("qwen2", {"tie": True}), ("gemma2", {}), ("llama", {"padded": True}), ("gemma2", {"padded": True})]


@pytest.mark.parametrize("family,opts", CASES, ids=[f"{f}-{'-'.join(o) or 'plain'}" for f, o in CASES])
def test_fused_path_matches_the_logits_path(family, opts, seed):
    """fused_linear_kl on hidden_states_of / lm_head_of == reference.distill_loss on the models'
    own logits (soft-cap included), loss and the gradient of every student parameter, in float64."""
    padded = opts.get("padded", False)
    student = tiny(family, 32, tie=opts.get("tie", False), bias=opts.get("bias", False))
    teacher = tiny(family, 48, vocab=V + 64 if padded else V, layers=2)
    ids, labels = batch()
    kw = dict(temperature=2.0, alpha=0.3, divergence="jsd", beta=0.4, vocab_size=V if padded else None)
    hs, ht = hidden_states_of(student, input_ids=ids), hidden_states_of(teacher, input_ids=ids)
    head_s, head_t = lm_head_of(student), lm_head_of(teacher)
    if opts.get("tie"):
        assert head_s.weight is student.get_input_embeddings().weight
    assert (head_s.bias is not None) == opts.get("bias", False)
    assert head_s.softcap == (3.0 if family == "gemma2" else None)
    import kdkernels

    loss = kdkernels.fused_linear_kl(hs[:, :-1], head_s.weight, ht[:, :-1], head_t.weight, student_bias=head_s.bias,
                                     labels=labels[:, 1:], student_softcap=head_s.softcap,
                                     teacher_softcap=head_t.softcap, **kw)
    params = [p for p in student.parameters()]
    grads = torch.autograd.grad(loss, params)
    s_logits = student(input_ids=ids).logits
    with torch.no_grad():
        t_logits = teacher(input_ids=ids).logits
    ref = reference.distill_loss(s_logits[:, :-1], t_logits[:, :-1], labels[:, 1:], **kw)
    ref_grads = torch.autograd.grad(ref, params)
    assert_close(loss, ref, torch.float64, f"loss {family} {opts} seed={seed}")
    for (name, _), g, rg in zip(student.named_parameters(), grads, ref_grads):
        assert_close(g, rg, torch.float64, f"grad {name} {family} {opts} seed={seed}")


def test_lm_head_of_reads_the_config_and_rejects_what_it_cannot_read():
    cohere = transformers.CohereForCausalLM(transformers.CohereConfig(
        vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, logit_scale=0.0625))
    assert lm_head_of(cohere).logit_scale == 0.0625 and lm_head_of(cohere).softcap is None
    granite = transformers.GraniteForCausalLM(transformers.GraniteConfig(
        vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, logits_scaling=8.0))
    assert lm_head_of(granite).logit_scale == 0.125
    base = tiny("llama", 32).model  # a LlamaModel: no lm_head
    with pytest.raises(ValueError, match="LlamaModel has no output embedding"):
        lm_head_of(base)
    with pytest.raises(ValueError, match="LlamaModel has no decoder"):
        hidden_states_of(base, input_ids=torch.zeros(1, 3, dtype=torch.long))


def test_cohere_and_granite_transforms_match_their_logits(seed):
    """The logit scale read from the config is the one the model's forward applies."""
    for cls, cfg_cls, extra in ((transformers.CohereForCausalLM, transformers.CohereConfig, dict(logit_scale=0.5)),
                                (transformers.GraniteForCausalLM, transformers.GraniteConfig,
                                 dict(logits_scaling=4.0))):
        cfg = cfg_cls(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                      num_key_value_heads=2, **extra)
        model = cls(cfg).double()
        ids = torch.randint(0, V, (2, 6))
        head = lm_head_of(model)
        h = hidden_states_of(model, input_ids=ids)
        logits = (h @ head.weight.T) * head.logit_scale
        assert_close(logits, model(input_ids=ids).logits, torch.float64, cls.__name__)


def _trainer(tmp_path, student, teacher, data, **kw):
    args = transformers.TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True, save_strategy="no",
                                          logging_steps=1, disable_tqdm=True, dataloader_num_workers=0,
                                          **{k: v for k, v in kw.items() if k not in ("distill",)})
    return DistillationTrainer(model=student, args=args, teacher_model=teacher, train_dataset=data,
                               **kw.get("distill", {}))


def _rows(n, vocab=V, seq=12, masked=()):
    out = []
    for i in range(n):
        ids = torch.randint(0, vocab, (seq,))
        labels = ids.clone()
        if i in masked:
            labels[: masked[i]] = -100
        out.append({"input_ids": ids, "labels": labels, "attention_mask": torch.ones(seq, dtype=torch.long)})
    return out


def test_trainer_trains_and_the_teacher_stays_frozen(tmp_path):
    """Ten steps: the distillation loss falls; the teacher (parameters left requiring grad, only
    put in eval mode by the trainer) gets no gradient and stays in eval mode."""
    torch.manual_seed(0)
    student, teacher = tiny("llama", 32), tiny("llama", 48, layers=2)
    teacher.train()
    assert all(p.requires_grad for p in teacher.parameters())
    trainer = _trainer(tmp_path, student, teacher, _rows(16), max_steps=10, per_device_train_batch_size=4,
                       learning_rate=3e-2, distill=dict(temperature=2.0))
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 10 and losses[-1] < 0.8 * losses[0], losses
    assert all(p.grad is None for p in teacher.parameters())
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())


def test_a_teacher_left_requiring_grad_costs_no_backward():
    """distillation_loss called directly with a teacher whose parameters require grad (only the
    student is meant to train): the loss's graph does not reach a single teacher parameter, so the
    backward computes nothing for it (no [V, H] weight gradient), and the teacher's mode is kept."""
    student, teacher = tiny("llama", 32), tiny("llama", 48)
    teacher.train()
    ids, labels = batch()
    from kdkernels.integrations.hf import distillation_loss

    loss = distillation_loss(student, teacher, {"input_ids": ids, "labels": labels}, temperature=2.0)
    grads = torch.autograd.grad(loss, list(teacher.parameters()), allow_unused=True)
    assert all(g is None for g in grads)
    assert teacher.training


def test_gradient_accumulation_equals_the_whole_batch(tmp_path):
    """Two micro-batches of 2 (with unequal numbers of ignored labels) and one batch of 4 give the
    same step: the Trainer's num_items_in_batch divides the summed loss in both."""
    torch.manual_seed(1)
    data = _rows(4, masked={0: 9, 3: 2})
    s0, teacher = tiny("qwen2", 32), tiny("qwen2", 48)
    params = {}
    for accumulate, per_device in ((1, 4), (2, 2)):
        student = tiny("qwen2", 32)
        student.load_state_dict(s0.state_dict())
        trainer = _trainer(tmp_path / str(accumulate), student, teacher, data, max_steps=1,
                           per_device_train_batch_size=per_device, gradient_accumulation_steps=accumulate,
                           learning_rate=0.5, optim="sgd", lr_scheduler_type="constant", max_grad_norm=0.0,
                           weight_decay=0.0, distill=dict(alpha=0.5, temperature=1.5))
        trainer.train()
        params[accumulate] = {k: v.detach().clone() for k, v in student.named_parameters()}
    moved = sum((params[1][k] - s0.state_dict()[k]).norm().item() for k in params[1])
    assert moved > 1e-3
    for k in params[1]:
        assert_close(params[2][k], params[1][k], torch.float64, k)


@pytest.mark.parametrize("beta", [0.0, 0.4, 1.0])
@pytest.mark.parametrize("num_items", [None, 23])
def test_trl_gkd_compute_loss_equals_trls(beta, num_items, seed):
    """kdkernels.integrations.trl.GKDTrainer.compute_loss against TRL's own GKDTrainer.compute_loss
    (the logits and TRL's generalized_jsd_loss) on the same models and batch: loss and every
    student gradient, with and without the Trainer's num_items_in_batch."""
    pytest.importorskip("trl")
    import types

    from trl.experimental.gkd import GKDTrainer as TRLGKDTrainer

    from kdkernels.integrations.trl import GKDTrainer

    student, teacher = tiny("llama", 32), tiny("llama", 48, layers=2)
    ids, labels = batch()
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    trainer = types.SimpleNamespace(teacher_model=teacher, beta=beta,
                                    generalized_jsd_loss=TRLGKDTrainer.generalized_jsd_loss)
    params = list(student.parameters())
    n = None if num_items is None else torch.tensor(num_items)
    ours = GKDTrainer.compute_loss(trainer, student, inputs, num_items_in_batch=n)
    theirs = TRLGKDTrainer.compute_loss(trainer, student, inputs, num_items_in_batch=n)
    assert_close(ours, theirs, torch.float64, f"loss beta={beta} seed={seed}")
    for (name, _), g, rg in zip(student.named_parameters(), torch.autograd.grad(ours, params),
                                torch.autograd.grad(theirs, params)):
        assert_close(g, rg, torch.float64, f"grad {name} beta={beta} seed={seed}")


HF_MEMORY_PROBE = """
    import sys, torch, transformers
    from kdkernels.integrations.hf import distillation_loss
    torch.set_num_threads(1)
    V = int(sys.argv[1])
    def model(h):
        cfg = transformers.LlamaConfig(vocab_size=V, hidden_size=h, intermediate_size=2 * h, num_hidden_layers=1,
                                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
        return transformers.LlamaForCausalLM(cfg)
    student, teacher = model(32), model(48)
    ids = torch.randint(0, V, (4, 128))
    batch = {"input_ids": ids, "labels": ids}
    distillation_loss(student, teacher, {"input_ids": ids[:, :8]}).backward()  # load code paths
    student.zero_grad(set_to_none=True)
    extra = peak_extra(lambda: distillation_loss(student, teacher, batch, temperature=2.0).backward())
    print(extra - sum(p.grad.numel() * p.grad.element_size() for p in student.parameters() if p.grad is not None))
"""


@pytest.mark.skipif(not HAS_PEAK_RSS_RESET, reason="needs Linux /proc peak-RSS reset")
def test_peak_memory_of_a_step_is_flat_in_the_vocabulary():
    """One distillation step (both trunks, the fused loss, backward) of 512 tokens: its peak memory
    beyond the student's gradients is the same at V = 8192 and V = 131072 (one [512, 131072]
    float32 logits tensor would be 256 MiB)."""
    small, large = (run_memory_probe(HF_MEMORY_PROBE, V) for V in (8192, 131072))
    msg = f"beyond the gradients: {small / 2**20:.1f} MiB at V = 8192, {large / 2**20:.1f} MiB at V = 131072"
    assert large - small < 8 * 2**20, msg


TORCHRUN_SCRIPT = """
import os, sys, torch, transformers
sys.path.insert(0, {tests!r})
from test_integrations_hf import tiny, _rows
from kdkernels.integrations.hf import DistillationTrainer
out = sys.argv[1]
torch.manual_seed(3)
student, teacher = tiny("llama", 32), tiny("llama", 48)
torch.save(student.state_dict(), os.path.join(out, "init.pt")) if int(os.environ["RANK"]) == 0 else None
data = _rows(4, masked={{0: 9, 3: 2}})
args = transformers.TrainingArguments(output_dir=out, report_to=[], use_cpu=True, save_strategy="no", max_steps=1,
                                      per_device_train_batch_size=2, learning_rate=0.5, optim="sgd",
                                      lr_scheduler_type="constant", max_grad_norm=0.0, weight_decay=0.0,
                                      disable_tqdm=True, ddp_backend="gloo", dataloader_num_workers=0)
trainer = DistillationTrainer(model=student, args=args, teacher_model=teacher, train_dataset=data, alpha=0.5,
                              temperature=1.5)
assert trainer.args.world_size == 2, trainer.args.world_size
trainer.train()
torch.save({{k: v.detach() for k, v in student.named_parameters()}},
           os.path.join(out, f"rank{{os.environ['RANK']}}.pt"))
"""


@pytest.mark.skipif(not torch.distributed.is_available(), reason="needs torch.distributed with gloo")
def test_torchrun_two_processes_equal_one(tmp_path):
    """`torchrun --nproc_per_node=2` (DDP through accelerate, gloo): one step of 2 rows a rank
    equals one single-process step of the 4 rows (num_items_in_batch counted across the ranks,
    the loss scaled back as the Trainer's own), and both ranks hold the same parameters."""
    import os
    import subprocess
    import sys

    script = tmp_path / "run.py"
    script.write_text(TORCHRUN_SCRIPT.format(tests=os.path.dirname(os.path.abspath(__file__))))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TRL_EXPERIMENTAL_SILENCE": "1"}
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          str(script), str(tmp_path)], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    torch.manual_seed(3)
    student, teacher = tiny("llama", 32), tiny("llama", 48)
    student.load_state_dict(torch.load(tmp_path / "init.pt"))
    data = _rows(4, masked={0: 9, 3: 2})
    _trainer(tmp_path / "one", student, teacher, data, max_steps=1, per_device_train_batch_size=4, learning_rate=0.5,
             optim="sgd", lr_scheduler_type="constant", max_grad_norm=0.0, weight_decay=0.0,
             distill=dict(alpha=0.5, temperature=1.5)).train()
    init = torch.load(tmp_path / "init.pt")
    assert sum((ranks[0][k] - init[k]).norm().item() for k in ranks[0]) > 1e-3
    for k, v in student.named_parameters():
        assert torch.equal(ranks[0][k], ranks[1][k]), k
        assert_close(ranks[0][k], v, torch.float64, k)


def _fsdp2_worker(rank, world, init_file, out_dir):
    """FSDP2: every decoder layer and the whole student fully_shard-ed (the layout accelerate's
    FSDP2 plugin and torchtitan use), each rank distilling its 2 of 4 rows with the global
    num_items_in_batch; the summed losses and the averaged full gradients against the unsharded
    student on all 4 rows."""
    import copy
    import os

    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from kdkernels.integrations.hf import distillation_loss

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    mesh = init_device_mesh("cpu", (world,))
    errs = {}
    for tie in (False, True):
        torch.manual_seed(5)
        student, teacher = tiny("llama", 32, tie=tie, layers=2), tiny("llama", 48)
        plain = copy.deepcopy(student)
        for layer in student.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(student, mesh=mesh)
        rows = _rows(4, masked={0: 9, 3: 2})
        full = {k: torch.stack([r[k] for r in rows]) for k in rows[0]}
        mine = {k: v[2 * rank: 2 * rank + 2] for k, v in full.items()}
        n = int((full["labels"][:, 1:] != -100).sum())
        kw = dict(temperature=1.5, alpha=0.3, divergence="jsd", beta=0.4)
        loss = distillation_loss(student, teacher, mine, num_items_in_batch=n, **kw)
        loss.backward()
        total = loss.detach().clone()
        dist.all_reduce(total)
        ref = distillation_loss(plain, teacher, full, num_items_in_batch=n, **kw)
        ref.backward()
        errs[f"tie={tie} loss"] = ((total - ref).abs() / ref.abs()).item()
        grads = {k: p.grad.full_tensor() * world for k, p in student.named_parameters()}
        for k, p in plain.named_parameters():
            errs[f"tie={tie} d{k}"] = ((grads[k] - p.grad).norm() / p.grad.norm()).item()
        assert all(p.grad is None for p in teacher.parameters())
    torch.save(errs, os.path.join(out_dir, f"fsdp2_rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()
    os._exit(0)


@pytest.mark.skipif(not torch.distributed.is_available(), reason="needs torch.distributed with gloo")
def test_fsdp2_sharded_student_equals_the_unsharded_step(tmp_path):
    """distillation_loss (DistillationTrainer.compute_loss) on a student sharded with FSDP2's
    fully_shard, 2 processes on gloo, tied and untied heads: the lm_head weight is read after the
    root's forward has gathered it, so the loss and every gradient equal the unsharded step."""
    import torch.multiprocessing as mp

    mp.spawn(_fsdp2_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        errs = torch.load(tmp_path / f"fsdp2_rank{rank}.pt")
        bad = {k: v for k, v in errs.items() if not v < 1e-10}
        assert not bad and len(errs) > 10, (rank, bad)
