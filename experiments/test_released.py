"""The paper's baselines from Gururangan et al.'s released checkpoints (Sec. 4), with local stand-ins for the Hub."""
import json
import os
import shutil

import pytest

import reproduce
from experiments.conftest import transformers
from experiments.paper import RELEASED

TAPT_ID = RELEASED[("aclarc", "tapt", ("tapt",))]


@pytest.fixture()
def hub(model_dir, tmp_path):
    """A checkpoint folder holding 'roberta-base' and the released ACL-ARC TAPT checkpoint (other weights)."""
    d = tmp_path / "hub"
    shutil.copytree(model_dir, d / "roberta-base")
    tapt = transformers.BertForMaskedLM.from_pretrained(model_dir)
    for p in tapt.parameters():
        p.data.add_(0.05)  # a different body, as a TAPT checkpoint is
    tapt.save_pretrained(d / TAPT_ID)
    transformers.BertTokenizer.from_pretrained(model_dir).save_pretrained(d / TAPT_ID)
    return str(d)


def _run(argv):
    assert reproduce.main(argv) == 0


def test_tapt_fine_tunes_the_released_checkpoint_instead_of_re_training(hub, data_dir, tmp_path, capsys):
    os.remove(os.path.join(data_dir, "citation_intent", "train.txt"))  # the released run needs no TAPT corpus
    flags = ["--data-dir", data_dir, "--device", "cpu", "--quick", "--no-progress", "--seeds", "0"]
    out = str(tmp_path / "released")
    _run(["--task", "aclarc", "--mode", "tapt", "--model", "roberta-base", "--checkpoint-dir", hub,
          "--baselines", "released", "--out", out, "--download-only", *flags])  # only the checkpoint is loaded
    assert f"--download-only: model(s) {TAPT_ID} and 3 data file(s) of 1 run(s)" in capsys.readouterr().out
    _run(["--task", "aclarc", "--mode", "tapt", "--model", "roberta-base", "--checkpoint-dir", hub,
          "--baselines", "released", "--out", out, *flags])
    rec = json.load(open(os.path.join(out, "aclarc", "tapt__tapt__seed0.json")))
    assert rec["config"]["released_checkpoint"] == TAPT_ID and rec["config"]["tartan_mode"] == "finetune"
    assert rec["config"]["pretrain"] == [] and [s["stage"] for s in rec["stages"]] == ["finetune"]
    # the same as Eq. 2 on that checkpoint given as the body: the released weights are what was fine-tuned
    ref = str(tmp_path / "ref")
    _run(["--task", "aclarc", "--mode", "finetune", "--model", os.path.join(hub, TAPT_ID), "--out", ref, *flags])
    base = str(tmp_path / "base")
    _run(["--task", "aclarc", "--mode", "finetune", "--model", os.path.join(hub, "roberta-base"), "--out", base, *flags])
    test = lambda out, mode: json.load(open(os.path.join(out, "aclarc", f"{mode}.json")))["test"]  # noqa
    assert rec["test"] == test(ref, "finetune__none__seed0")
    assert rec["test"] != test(base, "finetune__none__seed0")
    # the table says which checkpoint stood for TAPT
    _run(["--table", "1", "--task", "aclarc", "--mode", "tapt", "--model", "roberta-base", "--checkpoint-dir", hub,
          "--baselines", "released", "--out", out, "--report-only", *flags])
    text = capsys.readouterr().out
    assert f"ACL-ARC TAPT: Eq. 2 on Gururangan et al.'s released checkpoint {TAPT_ID}" in text
    minutes = rec["wall_seconds"] / 60
    assert f"wall-clock (process CPU time): TAPT {minutes:.1f} ({rec['cpu_seconds'] / 60:.1f} CPU)." in text


def test_released_is_the_default_only_for_the_papers_body_and_budget():
    parser, _ = reproduce.build_parser()
    settings = lambda *a: reproduce.make_settings(parser.parse_args(["--table", "1", *a]), {})  # noqa
    assert settings().baselines == "auto"  # released checkpoints where they exist (not for Table 2's n = 10x)
    assert settings("--quick").baselines == "retrain"
    assert settings("--budget", "cpu").baselines == "retrain"
    assert settings("--model", "/some/minilm").baselines == "retrain"
    assert settings("--quick", "--baselines", "released").baselines == "released"


@pytest.mark.parametrize("argv, message", [
    (["--task", "aclarc", "--mode", "tapt", "--model", "/x/minilm", "--baselines", "released"],
     "--baselines released: the released checkpoints are roberta-base bodies"),
    (["--task", "aclarc", "--mode", "mt", "--baselines", "retrain"], "--baselines does not apply to --mode mt"),
    (["--task", "mammals", "--mode", "mt", "--max-length", "64"], "--max-length does not apply to mammals"),
    (["--table", "5", "--final-lr", "1e-5"], "--final-lr does not apply to --table 5"),
])
def test_baselines_flag_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        reproduce.main(argv)
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_released_named_where_there_is_none_is_one_message(model_dir, data_dir, tmp_path, capsys):
    code = reproduce.main(["--task", "aclarc", "--mode", "dapt", "--baselines", "released", "--model", "roberta-base",
                           "--data-dir", data_dir, "--out", str(tmp_path / "o"), "--quick", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 1 and "no released checkpoint for aclarc dapt aux=dapt10x seed 0" in err and "Traceback" not in err


def test_every_released_id_is_one_of_the_published_checkpoints():
    tapt = {"citation_intent_1688", "sciie_3219", "chemprot_4169", "hyperpartisan_news_515"}
    for (task, mode, aux), ckpt in RELEASED.items():
        assert ckpt.startswith("allenai/")
        if mode == "tapt":
            assert ckpt.startswith("allenai/dsp_roberta_base_tapt_") and ckpt.rsplit("tapt_", 1)[1] in tapt
        elif mode == "dapt":
            assert ckpt in {"allenai/cs_roberta_base", "allenai/biomed_roberta_base", "allenai/news_roberta_base"}
        else:
            assert ckpt.startswith("allenai/dsp_roberta_base_dapt_") and ckpt.rsplit("tapt_", 1)[1] in tapt
