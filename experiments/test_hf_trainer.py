"""experiments/hf_trainer.py: TARTAN's weighting inside a Hugging Face Trainer, with a tiny BERT from a config."""
import os
import random
import sys

import pytest
import torch

import tartan
from experiments import tasks

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")  # the Trainer needs it (experiments/requirements-test.txt)

from experiments.hf_trainer import MultiTaskModel, TartanTrainer  # noqa: E402

WORDS = [f"w{i}" for i in range(30)]


def _setup(n_train=32):
    """A tiny BERT body, an end-task whose label is a sentence's word group, one MLM auxiliary task."""
    tok = transformers.BertTokenizer(vocab={t: i for i, t in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]",
                                                                         "[MASK]"] + WORDS)})
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=64, max_position_embeddings=64, hidden_dropout_prob=0.0,
                                  attention_probs_dropout_prob=0.0)
    body, mlm = tartan.split_masked_lm(transformers.AutoModelForMaskedLM.from_config(cfg))
    rng = random.Random(0)
    texts = [" ".join(rng.choice(WORDS[(i % 3) * 10:(i % 3 + 1) * 10]) for _ in range(6)) for i in range(n_train + 16)]
    labels = [i % 3 for i in range(n_train + 16)]
    end = tasks.end_task("toy", {"train": (texts[:n_train], labels[:n_train]), "dev": (texts[n_train:], labels[
        n_train:]), "test": (texts[n_train:], labels[n_train:])}, tok, 32, max_length=16)
    aux = tasks.mlm_task("tapt", texts, tok, body, mlm, max_length=16)
    rows = []  # the Trainer's dataset: every row padded to 16, so that the default collator stacks them
    for ids, y in zip(end.train.ids, end.train.labels):
        pad = 16 - len(ids)
        rows.append({"input_ids": torch.tensor(ids + [tok.pad_token_id] * pad),
                     "attention_mask": torch.tensor([1] * len(ids) + [0] * pad), "labels": y})
    model = MultiTaskModel(body, [end.head, aux.head])
    streams = dict(aux=[tartan.batches(aux, 8, torch.Generator().manual_seed(1))],
                   dev=tartan.batches(tartan.Task("dev", end.head, end.dev), 8, torch.Generator().manual_seed(2)))
    return model, rows, streams


def _args(tmp_path, steps, accum, **more):
    """The Trainer's arguments, its default saving included (a checkpoint at the last step, every 500 before)."""
    return transformers.TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=8, max_steps=steps,
                                          gradient_accumulation_steps=accum, learning_rate=1e-3, report_to=[],
                                          logging_steps=1, use_cpu=True, seed=0, remove_unused_columns=False,
                                          disable_tqdm=True, **more)


def _weighting(model, meta):
    cfg = tartan.MetaConfig(meta_batch_size=8, grad_accum=2, meta_lr=0.1)
    return tartan.MetaWeighting(model.body, 2, 3, cfg) if meta else tartan.MTWeighting(model.body, 2, grad_accum=2)


@pytest.mark.parametrize("meta", [True, False])
def test_trainer_subclass_trains_every_task_with_tartans_weights(tmp_path, meta):
    model, rows, streams = _setup()
    weighting = _weighting(model, meta)
    heads_before = [p.detach().clone() for p in model.heads.parameters()]
    body_before = [p.detach().clone() for p in model.body.parameters()]
    trainer = TartanTrainer(model=model, args=_args(tmp_path, 4, 2), train_dataset=rows, weighting=weighting,
                            aux=streams["aux"], dev=streams["dev"] if meta else None)
    trainer.train()
    assert trainer.state.global_step == 4 and weighting.steps == 4 and len(trainer.history) == 4
    for info in trainer.history:
        assert sum(info["alpha"]) == pytest.approx(1)
    if meta:  # w moved by eta * cos at each of the 4 steps: alpha follows from the recorded cosines
        w = torch.full((2,), 0.5, dtype=torch.float64)
        for info in trainer.history:
            w = w + 0.1 * torch.tensor(info["cosines"], dtype=torch.float64)
            assert info["alpha"] == pytest.approx(torch.softmax(w, 0).tolist())
        assert trainer.history[-1]["alpha"] != pytest.approx([0.5, 0.5], abs=1e-4)
    else:
        assert all(info["alpha"] == [0.5, 0.5] for info in trainer.history)
    # every head trained (the auxiliary MLM head too), and the body
    assert all(not torch.equal(a, b) for a, b in zip(heads_before, model.heads.parameters()))
    assert sum(not torch.equal(a, b) for a, b in zip(body_before, model.body.parameters())) > 0


def test_trainer_subclass_refuses_mismatched_accumulation(tmp_path):
    model, rows, streams = _setup(n_train=24)  # 3 batches of 8 per epoch: the second step of an epoch is partial
    weighting = tartan.MTWeighting(model.body, 2, grad_accum=2)
    with pytest.raises(ValueError, match="grad_accum=2 micro-batches but the Trainer over "
                                         "gradient_accumulation_steps=1"):
        TartanTrainer(model=model, args=_args(tmp_path, 2, 1), train_dataset=rows, weighting=weighting,
                      aux=streams["aux"])
    trainer = TartanTrainer(model=model, args=_args(tmp_path, 4, 2), train_dataset=rows, weighting=weighting,
                            aux=streams["aux"])
    with pytest.raises(ValueError, match="an epoch ended after 1 of 2 accumulated micro-batches"):
        trainer.train()


def _trainer(tmp_path, meta, **args):
    model, rows, streams = _setup()
    weighting = _weighting(model, meta)
    return TartanTrainer(model=model, args=_args(tmp_path, 4, 2, **args), train_dataset=rows, weighting=weighting,
                         aux=streams["aux"], dev=streams["dev"] if meta else None)


@pytest.mark.parametrize("meta", [True, False])
def test_trainer_saves_tied_heads_logs_the_weights_and_resumes_the_weighting(tmp_path, meta):
    """With a tied MLM head, the Trainer's default save (and save_model) crashed with safetensors' "Some tensors share
    memory"; a resumed Trainer began from a new weighting (steps 2 at global step 4); alpha never reached the logs.
    Now a checkpoint every 2 steps holds the weighting; a new Trainer resumed from step 2 continues its w and step
    count; the decoder is saved once and tied again on loading; log_history has alpha_k (and META's cos_k)."""
    trainer = _trainer(tmp_path, meta, save_steps=2)
    trainer.train()
    assert sorted(d for d in os.listdir(tmp_path) if d.startswith("checkpoint")) == ["checkpoint-2", "checkpoint-4"]
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logs) == 4 and [e["alpha_1"] for e in logs] == [info["alpha"][1] for info in trainer.history]
    assert all(("cos_0" in e and "cos_1" in e) == meta for e in logs)
    trainer.save_model(str(tmp_path / "final"))
    safetensors = pytest.importorskip("safetensors.torch")
    saved = safetensors.load_file(str(tmp_path / "final" / "model.safetensors"))
    fresh, _, _ = _setup()
    fresh.load_state_dict(saved, strict=False)
    decoder = fresh.heads[1].lm_head.predictions.decoder.weight
    assert decoder is fresh.body.encoder.get_input_embeddings().weight
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), trainer.model.state_dict().values()))

    resumed = _trainer(tmp_path / "again", meta)
    resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    assert resumed.weighting.steps == resumed.state.global_step == 4 and len(resumed.history) == 2
    if meta:  # w after step 2 of the first run, then the resumed run's own cosine at step 3
        w = 0.5 + 0.1 * torch.tensor([info["cosines"] for info in trainer.history[:2]], dtype=torch.float64).sum(0)
        w = w + 0.1 * torch.tensor(resumed.history[0]["cosines"], dtype=torch.float64)
        assert resumed.history[0]["alpha"] == pytest.approx(torch.softmax(w, 0).tolist())


@pytest.mark.parametrize("meta", [True, False])
def test_trainer_honours_bf16(tmp_path, meta):
    """bf16=True was ignored in training (the body ran in fp32): now every forward of every task runs under the
    Trainer's bf16 autocast, and META's g_meta pass with it."""
    trainer = _trainer(tmp_path, meta, bf16=True, save_strategy="no")
    dtypes = []
    trainer.model.body.register_forward_pre_hook(lambda module, args: dtypes.append(
        torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu")))
    trainer.train()
    assert len(dtypes) >= 16 and set(dtypes) == {torch.bfloat16}
    assert trainer.weighting.steps == 4 and (not meta or trainer.weighting._seen.dtype == torch.bfloat16)


def _rank(out):
    """One process of test_trainer_under_torchrun: MT then META, each 4 steps with a checkpoint every 2, then again
    resumed from checkpoint-2; each rank saves its parameters, w and logged alpha."""
    import torch.distributed as dist
    results = {}
    for meta in (False, True):
        first = _trainer(os.path.join(out, f"run{meta:d}"), meta, save_steps=2)
        first.train()
        again = _trainer(os.path.join(out, f"again{meta:d}"), meta, save_steps=2)
        again.train(resume_from_checkpoint=os.path.join(out, f"run{meta:d}", "checkpoint-2"))
        results[meta] = [{"params": torch.cat([p.detach().reshape(-1) for p in t.model.parameters()]),
                          "w": t.weighting.w.cpu(), "steps": t.weighting.steps,
                          "alpha": [info["alpha"] for info in t.history]} for t in (first, again)]
    torch.save(results, os.path.join(out, f"rank{dist.get_rank()}.pt"))
    dist.destroy_process_group()  # before the interpreter exits: gloo's threads left running abort the process


def test_trainer_under_torchrun(tmp_path):
    """Under torchrun the Trainer hands training_step its DDP wrapper ("'DistributedDataParallel' object has no
    attribute 'body'"): now two processes (gloo, CPU), each with its shard of the end-task, keep identical parameters
    and w, for MT and META, from the start and resumed from a checkpoint; META's w moved."""
    import subprocess
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "-m", "experiments.test_hf_trainer", str(tmp_path)], cwd=root, capture_output=True,
                         text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    for meta in (False, True):
        for a, b in zip(ranks[0][meta], ranks[1][meta]):
            assert torch.equal(a["params"], b["params"]) and torch.equal(a["w"], b["w"]), meta
            assert a["alpha"] == b["alpha"] and a["steps"] == b["steps"] == 4
    assert ranks[0][True][1]["alpha"][-1] != pytest.approx([0.5, 0.5], abs=1e-4)


if __name__ == "__main__":  # a rank of test_trainer_under_torchrun
    _rank(sys.argv[1])
