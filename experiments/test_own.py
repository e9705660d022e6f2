"""A user's own end-task (--task-dir): one command per mode, its table, bad input, and what a user keeps
(--save-model, per-example predictions)."""
import json
import os
import shutil
import tempfile

import pytest
import torch

import reproduce
import tartan
from experiments import keep, own, tasks
from experiments.conftest import leftovers, own_flags, results_in


def test_own_task_runs_every_mode_and_prints_its_table(model_dir, own_dir, tmp_path, capsys, monkeypatch):
    out = str(tmp_path / "out")
    extra = os.path.join(os.path.dirname(own_dir), "reviews.txt")
    assert reproduce.main(["--task-dir", own_dir, "--mode", "finetune", "tapt", "mt", "meta", "--seeds", "0-1",
                           "--aux-file", extra, "--metric", "micro_f1", *own_flags(model_dir, out)]) == 0
    text = capsys.readouterr().out
    assert results_in(out) == sorted(f"my_task/{m}__{a}__seed{s}.json" for m, a in (
        ("finetune", "none"), ("tapt", "file-reviews+tapt"), ("mt", "tapt+file-reviews"),
        ("meta", "tapt+file-reviews")) for s in (0, 1))
    table = open(os.path.join(out, "my_task", "table.md")).read()
    assert table in text and f"### my_task ({own_dir})" in table and "p vs tapt" in table
    rows = {line.split(" | ")[0][2:]: line for line in table.splitlines() if line.startswith("| ")}
    assert set(rows) >= {"finetune", "tapt", "mt", "meta"} and rows["tapt"].split(" | ")[4] == "—"
    assert "What META learned" in table and "| meta | 1 | file-reviews |" in table and "| meta | 0 | tapt |" in table
    assert "| meta | 0 | my_task (end-task) |" in table and "The meta head's loss on B*_val" in table \
        and "phi*'s training loss, first -> last" in table
    rec = json.load(open(os.path.join(out, "my_task", "meta__tapt+file-reviews__seed0.json")))
    assert rec["config"]["metric"] == "micro_f1"
    # the user's files by the task's or the corpus's name, never by where they sat here (no train.txt: train.jsonl)
    assert rec["config"]["corpora"] == {"tapt": "my_task/train.jsonl", "file-reviews": "file-reviews: reviews.txt"}
    assert sorted(rec["data_files"]) == ["file-reviews: reviews.txt"] + [f"my_task/{s}.jsonl" for s in
                                                                         ("dev", "test", "train")]
    assert str(tmp_path) not in json.dumps(rec) and "reviews.txt" in rec["command"]
    assert rec["headline"]["test"] == rec["test"]["micro_f1"]
    # --report-only prints the same table again, from the files
    assert reproduce.main(["--task-dir", own_dir, "--mode", "finetune", "tapt", "mt", "meta", "--seeds", "0-1",
                           "--aux-file", extra, "--metric", "micro_f1", "--report-only",
                           *own_flags(model_dir, out)]) == 0
    assert table in capsys.readouterr().out

    def read_only(*args, **kwargs):  # results on a read-only mount: no file can be made there
        raise PermissionError(13, "Permission denied")
    with monkeypatch.context() as m:
        m.setattr(tempfile, "mkstemp", read_only)
        assert reproduce.main(["--task-dir", own_dir, "--mode", "finetune", "tapt", "mt", "meta", "--seeds", "0-1",
                               "--aux-file", extra, "--metric", "micro_f1", "--report-only",
                               *own_flags(model_dir, out)]) == 1
    printed = capsys.readouterr()
    assert table in printed.out  # shown all the same, and the error names the file
    assert printed.err == f"error: [Errno 13] Permission denied: '{out}/my_task/table.md'\n"
    # seeds without result files are said to be left out; a --report-only that finds none at all is an error
    assert reproduce.main(["--task-dir", own_dir, "--mode", "mt", "meta", "--seeds", "0-2", "--aux-file", extra,
                           "--metric", "micro_f1", "--report-only", *own_flags(model_dir, out)]) == 0
    assert f"--report-only: 2 of 6 run(s) have no result file in {out} and are left out" in capsys.readouterr().out
    assert reproduce.main(["--task-dir", own_dir, "--mode", "mt", "--seeds", "5", "--aux-file", extra, "--metric",
                           "micro_f1", "--report-only", *own_flags(model_dir, out)]) == 1
    assert (f"error: --report-only: none of the 1 run(s) has a result file in {out} (drop --report-only"
            in capsys.readouterr().err)


def test_a_moved_task_folder_finds_its_results(model_dir, own_dir, tmp_path, capsys):
    """Result files name a user's files by content and name, not place: the same command from a moved folder (and
    --aux-file) takes its finished run, and one whose file changed is refused."""
    out, flags = str(tmp_path / "out"), ["--mode", "mt", "--seeds", "0", "--aux", "tapt", "--limit", "1000"]
    extra = os.path.join(os.path.dirname(own_dir), "reviews.txt")
    assert reproduce.main(["--task-dir", own_dir, "--aux-file", extra, *flags, *own_flags(model_dir, out)]) == 0
    path = os.path.join(out, "my_task", "mt__tapt+file-reviews__seed0.json")
    made = open(path).read()
    moved = tmp_path / "elsewhere"
    shutil.copytree(own_dir, moved / "my_task")
    shutil.copy(extra, moved / "reviews.txt")
    capsys.readouterr()
    argv = ["--task-dir", str(moved / "my_task"), "--aux-file", str(moved / "reviews.txt"), *flags,
            *own_flags(model_dir, out)]
    assert reproduce.main(argv) == 0
    assert open(path).read() == made and "seed 0: dev" not in capsys.readouterr().out  # taken, not trained again
    with open(moved / "reviews.txt", "a") as f:
        f.write("one more line of text\n")
    assert reproduce.main(argv) == 1
    assert "was made from another file-reviews: reviews.txt" in capsys.readouterr().err


def test_saved_model_loads_back_and_reproduces_the_test_score(model_dir, own_dir, tmp_path):
    out, saved = str(tmp_path / "out"), str(tmp_path / "saved")
    assert reproduce.main(["--task-dir", own_dir, "--mode", "tapt", "--seeds", "0", "--save-model", saved,
                           "--limit", "1000", *own_flags(model_dir, out)]) == 0
    rec = json.load(open(os.path.join(out, "my_task", "tapt__tapt__seed0.json")))
    body, head, tokenizer, info = keep.load_model(saved)
    assert info["labels"] == ["c0", "c1", "c2"] and info["task"] == "my_task"
    end = tasks.end_task("my_task", own_dir, tokenizer, body.hidden_size, rec["config"]["max_length"])
    assert tartan.evaluate(body, head, end.test) == pytest.approx(rec["test"])
    preds = [json.loads(line) for line in open(os.path.join(out, "my_task", "tapt__tapt__seed0.predictions.jsonl"))]
    gold = tasks.read_jsonl(os.path.join(own_dir, "test.jsonl"))
    assert [p["line"] for p in preds] == gold[2] and [p["gold"] for p in preds] == gold[1]
    assert tartan.f1_scores([p["gold"] for p in preds], [p["predicted"] for p in preds])["macro_f1"] == \
        pytest.approx(rec["test"]["macro_f1"])
    assert not leftovers(str(tmp_path)) and sorted(os.listdir(tmp_path)) == ["my_task", "out", "reviews.txt",
                                                                                 "saved"]


@pytest.mark.parametrize("line, message", [
    ('{"text": "w1 w2"}\n', "test.jsonl, line 2: missing field 'label'"),
    ('{"text": "w1", "label": "c9"}\n', "test.jsonl, line 2: label 'c9' never appears in train.jsonl"),
    ("not json\n", "test.jsonl, line 2: malformed JSON"),
    ('{"text": "w1", "label": " "}\n', "test.jsonl, line 2: 'label' must be a non-empty string or an integer"),
])
def test_bad_input_in_a_users_folder_is_one_message_naming_file_and_line(model_dir, own_dir, tmp_path, capsys,
                                                                          line, message):
    with open(os.path.join(own_dir, "test.jsonl")) as f:
        first = f.readline()
    with open(os.path.join(own_dir, "test.jsonl"), "w") as f:
        f.write(first + line)
    out = str(tmp_path / "out")
    assert reproduce.main(["--task-dir", own_dir, "--mode", "finetune", "--seeds", "0",
                           *own_flags(model_dir, out)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err and "Traceback" not in err and not os.path.exists(out)


def test_a_jsonl_aux_file_is_read_before_any_run_trains(model_dir, own_dir, tmp_path, capsys):
    """A .jsonl --aux-file is read as the run reads it (the texts of a JSONL split), before finetune trains: a bad
    line is one message, and no run of the command has written a result."""
    corpus = tmp_path / "corp.jsonl"
    corpus.write_text('{"text": "w1 w2", "label": "c0"}\n{"text": "w3"\n')
    out = str(tmp_path / "out")
    assert reproduce.main(["--task-dir", own_dir, "--mode", "finetune", "mt", "--seeds", "0", "--aux-file",
                           str(corpus), *own_flags(model_dir, out)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "corp.jsonl, line 2: malformed JSON" in err and not os.path.exists(out)


def test_a_train_txt_that_is_not_a_file_is_not_passed_over(model_dir, own_dir, tmp_path, capsys):
    os.mkdir(os.path.join(own_dir, "train.txt"))
    assert reproduce.main(["--task-dir", own_dir, "--mode", "tapt", "--seeds", "0",
                           *own_flags(model_dir, str(tmp_path / "out"))]) == 1
    assert "train.txt: not a file (the task's TAPT text" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "out")


def test_an_empty_text_is_one_warning_line_once_per_command(model_dir, own_dir, tmp_path, capsys):
    with open(os.path.join(own_dir, "dev.jsonl"), "a") as f:
        f.write('{"text": "", "label": "c0"}\n')  # read several times by one command
    assert reproduce.main(["--task-dir", own_dir, "--mode", "finetune", "--seeds", "0",
                           *own_flags(model_dir, str(tmp_path / "out"))]) == 0
    err = capsys.readouterr().err
    assert [line for line in err.splitlines() if "empty text" in line] == [
        f"warning: {os.path.join(own_dir, 'dev.jsonl')}: 1 example(s) with empty text (line 19), kept: the model "
        f"sees only its special tokens for them"]


def test_a_folder_missing_a_split_says_which(model_dir, own_dir, tmp_path, capsys):
    os.remove(os.path.join(own_dir, "dev.jsonl"))
    assert reproduce.main(["--task-dir", own_dir, "--mode", "finetune", *own_flags(model_dir, str(tmp_path))]) == 1
    assert "missing dev.jsonl" in capsys.readouterr().err
    open(os.path.join(own_dir, "dev.jsonl"), "w").close()
    os.rename(own_dir, tmp_path / "aclarc")
    with pytest.raises(reproduce.ReproduceError, match="'aclarc' is a task of the paper"):
        own.own_tasks([str(tmp_path / "aclarc")])


@pytest.mark.parametrize("argv, message", [
    (["--task", "aclarc", "--mode", "mt", "--metric", "micro_f1"], "--metric does not apply without --task-dir"),
    (["--task-dir", "d", "--mode", "mt", "--baseline", "tapt"], "--baseline tapt is not one of the modes run"),
    (["--table", "1", "--task-dir", "d"], "--task-dir goes with --mode"),
    (["--task-dir", "d", "--mode", "mt", "--save-model", "m", "--report-only"],
     "--save-model does not apply to --report-only"),
    (["--table", "1", "--save-model", "m"], "--save-model does not apply to --table 1"),
    (["--task", "demo", "--shard", "0/2"], "--shard does not apply to --task demo"),
    (["--task-dir", "d", "--mode", "mt", "--data-dir", "x"], "--data-dir does not apply to --task-dir alone"),
])
def test_flags_of_own_tasks_that_do_not_apply(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        reproduce.main(argv)
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_save_model_never_replaces_a_folder_that_is_not_a_saved_model(tmp_path):
    from experiments.common import ReproduceError
    folder = tmp_path / "results"
    folder.mkdir()
    (folder / "precious.json").write_text("{}")
    with pytest.raises(ReproduceError, match="not a model saved by --save-model"):
        keep.save_model_atomic(str(folder), torch.nn.Linear(2, 2), torch.nn.Linear(2, 2), None, {})
    assert (folder / "precious.json").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["results"]


def test_save_model_into_a_folder_that_is_not_a_saved_model_fails_before_training(model_dir, own_dir, tmp_path,
                                                                                   monkeypatch, capsys):
    folder = tmp_path / "notes"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    monkeypatch.setattr(tartan, "run_end_task", lambda *a, **k: pytest.fail("trained before the folder was checked"))
    assert reproduce.main(["--task-dir", own_dir, "--mode", "finetune", "--seeds", "0", "--save-model", str(folder),
                           *own_flags(model_dir, str(tmp_path / "out"))]) == 1
    assert "not a model saved by --save-model" in capsys.readouterr().err
    assert os.listdir(folder) == ["notes.txt"]


def test_save_model_where_no_folder_can_be_made_fails_before_training(model_dir, own_dir, tmp_path, monkeypatch,
                                                                     capsys):
    (tmp_path / "a_file").write_text("mine")
    folder = str(tmp_path / "a_file" / "model")
    monkeypatch.setattr(tartan, "run_end_task", lambda *a, **k: pytest.fail("trained before the folder was checked"))
    assert reproduce.main(["--task-dir", own_dir, "--mode", "finetune", "--seeds", "0", "--save-model", folder,
                           *own_flags(model_dir, str(tmp_path / "out"))]) == 1
    err = capsys.readouterr().err
    assert f"--save-model {folder}: a model cannot be written there (" in err and err.count("\n") == 1
    assert not results_in(str(tmp_path / "out"))


def test_save_model_inside_or_above_out_is_refused(capsys):
    for save, out in (("res", "res"), ("res", "res/sub"), ("res/m", "res")):
        with pytest.raises(SystemExit) as e:
            reproduce.main(["--task", "aclarc", "--mode", "finetune", "--save-model", save, "--out", out])
        assert e.value.code == 2 and "give a folder outside --out" in capsys.readouterr().err


def test_a_checkpoint_saved_in_bf16_trains_in_every_mode(own_dir, tmp_path):
    """Many Hub checkpoints are saved in bf16: the body loads with fp32 weights (mixed precision is autocast's), so
    fine-tuning, MT and META run from one through the command line (they stopped at a dtype mismatch at the heads)."""
    import transformers
    bf16_dir = str(tmp_path / "bf16-model")
    tok = transformers.BertTokenizer(vocab={t: i for i, t in enumerate(
        ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(30)])})
    cfg = transformers.BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=64, max_position_embeddings=64)
    torch.manual_seed(0)
    transformers.BertForMaskedLM(cfg).to(torch.bfloat16).save_pretrained(bf16_dir)
    tok.save_pretrained(bf16_dir)
    out = str(tmp_path / "out")
    assert reproduce.main(["--task-dir", own_dir, "--mode", "finetune", "mt", "meta", "--seeds", "0",
                           *own_flags(bf16_dir, out)]) == 0
    assert results_in(out) == sorted(f"my_task/{m}__{a}__seed0.json" for m, a in (
        ("finetune", "none"), ("mt", "tapt"), ("meta", "tapt")))
