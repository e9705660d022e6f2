"""experiments/resume.py: an interrupted run, continued from its progress files, gives the uninterrupted result."""
import dataclasses
import functools
import math
import os
import tempfile
import time
import warnings

import pytest
import torch

import tartan
from experiments import resume
from test_tartan import SMALL, build, small_config, task_dir, tok  # noqa: F401 (fixtures)


class _Interrupted(Exception):
    pass


def _without_seconds(x):
    """A result without its timings (and the resume record): what must not depend on an interruption."""
    if isinstance(x, dict):
        return {k: _without_seconds(v) for k, v in x.items() if k not in ("seconds", "analysis_seconds", "resumed")}
    return [_without_seconds(v) for v in x] if isinstance(x, list) else x


@pytest.mark.parametrize("mode, head_data", [("pretrain", "train"), ("mt", "train"), ("meta", "train"),
                                             ("meta", "dev")])
def test_an_interrupted_run_resumes_to_the_uninterrupted_result(tok, task_dir, tmp_path, monkeypatch, mode,
                                                                  head_data):
    """A run killed at optimizer steps inside every stage (pre-training or the main stage, the fine-tune, the final
    fine-tune) and called again, in a new 'process' (fresh model, other global seed), with the same progress file
    gives the uninterrupted run's result, every float and the final weights alike, and then removes its files."""
    stop, real_clip = {"at": None, "calls": 0}, tartan.clip_grad_norm

    def clip(*args):  # an interruption just before the optimizer step `stop["at"]` of this process
        stop["calls"] += 1
        if stop["calls"] == stop["at"]:
            raise _Interrupted
        return real_clip(*args)
    monkeypatch.setattr(tartan, "clip_grad_norm", clip)
    final = tartan.FinetuneConfig(max_steps=6, eval_every=2, patience=3, batch_size=8, lr=1e-3, head_lr=1e-3)
    cfg = small_config(mode == "meta", final_finetune=final, **({"meta_head_data": head_data} if mode == "meta"
                                                                 else {})) if mode != "pretrain" else final
    pre = [tartan.PretrainConfig(max_steps=6, aux_batch_size=8, grad_accum=1)]
    folder = tmp_path / "progress"
    folder.mkdir()

    def run(stop_at=None, path=None, seed=0):
        stop.update(at=stop_at, calls=0)
        body, end, aux = build(tok, task_dir)
        torch.manual_seed(seed)  # dropout: a resumed run must take the random state from its progress file
        out = resume.run_end_task(body, end, aux, mode, cfg, pre, path=path, every=0)
        return out, [p.detach().clone() for p in body.parameters()]

    want, want_weights = run()
    path = str(folder / "run.pt")
    # killed at: pretrain step 3, fine-tune steps 1, 3, 4; or main-stage step 3, final fine-tune steps 2, 4, 5
    for i, stop_at in enumerate((3, 5, 3, 2) if mode == "pretrain" else (3, 12, 3, 2)):
        with pytest.raises(_Interrupted):
            run(stop_at, path, seed=100 * i)  # the first call is the reference run's; the others start elsewhere
        assert os.listdir(folder)  # a stage's progress file, or the record of the finished stages
    got, got_weights = run(None, path, seed=200)
    assert _without_seconds(got) == _without_seconds(want)
    assert all(torch.equal(a, b) for a, b in zip(got_weights, want_weights))
    assert got["resumed"]["wall_seconds"] > 0 and want["resumed"] is None
    assert os.listdir(folder) == []  # done: the progress files are gone


def test_a_run_killed_between_saving_a_stage_and_removing_its_progress_file_resumes(tok, task_dir, tmp_path,
                                                                                  monkeypatch):
    """The window after a stage's record is saved and before its own progress file is removed: the next stage must not
    read the finished stage's file."""
    def run(path=None):
        body, end, aux = build(tok, task_dir)
        torch.manual_seed(0)
        cfg = small_config(False, final_finetune=tartan.FinetuneConfig(max_steps=4, eval_every=2, batch_size=8))
        return _without_seconds(resume.run_end_task(body, end, aux, "mt", cfg, path=path, every=0))
    (tmp_path / "ck").mkdir()
    want, path, real_remove = run(), str(tmp_path / "ck" / "run.pt"), resume.ProgressFile.remove

    def killed(self):
        if self.path.endswith(".stage0"):
            raise _Interrupted
        real_remove(self)
    monkeypatch.setattr(resume.ProgressFile, "remove", killed)
    with pytest.raises(_Interrupted):
        run(path)
    monkeypatch.setattr(resume.ProgressFile, "remove", real_remove)
    assert sorted(os.listdir(tmp_path / "ck")) == ["run.pt", "run.pt.stage0"]
    assert run(path) == want and os.listdir(tmp_path / "ck") == []


def _short_mt_run(tok, task_dir, path=None):
    """A short MT run, saving at every chance to `path`; its result without timings."""
    body, end, aux = build(tok, task_dir)
    torch.manual_seed(0)
    return _without_seconds(resume.run_end_task(body, end, aux, "mt", small_config(False, final_finetune=None),
                                                path=path, every=0))


# writing the file (torch.save reports a full disk as OSError or, from its zip writer, as RuntimeError), or making it
@pytest.mark.parametrize("fails", ["torch.save", "torch.save:zip", "tempfile.mkstemp"])
def test_a_progress_file_that_cannot_be_written_does_not_end_the_run(tok, task_dir, tmp_path, monkeypatch, fails):
    run = functools.partial(_short_mt_run, tok, task_dir)
    want = run()

    def full(*args, **kwargs):
        if fails.endswith(":zip"):
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 97600 vs 97488: No space "
                               "left on device")
        raise OSError(28, "No space left on device")
    module, name = fails.split(":")[0].split(".")
    monkeypatch.setattr({"torch": torch, "tempfile": tempfile}[module], name, full)
    (tmp_path / "ck").mkdir()
    with pytest.warns(UserWarning) as caught:
        got = run(str(tmp_path / "ck" / "run.pt"))
    assert got == want and os.listdir(tmp_path / "ck") == []
    # one warning per file (the stage's progress file, the record of finished stages), not one per step
    assert sorted(str(w.message).split(" (")[0].rsplit("/", 1)[1] for w in caught) == ["run.pt", "run.pt.stage0"]
    assert all("No space left on device); the run goes on without saving" in str(w.message) for w in caught)


def test_a_progress_file_of_another_run_is_refused(tok, task_dir, tmp_path):
    body, end, aux = build(tok, task_dir)
    path = str(tmp_path / "run.pt")
    cfg = tartan.FinetuneConfig(**SMALL)
    other = {"mode": "finetune", "config": resume.settings(dataclasses.replace(cfg, lr=0.5)), "tasks": ["toy"],
             "pretrain": None}
    resume.ProgressFile(path).save({}, other)
    with pytest.raises(ValueError, match=r"holds the progress of another run \(config\): delete it"):
        resume.run_end_task(body, end, [], "finetune", cfg, path=path)
    stage = tartan.Loop(cfg, ["toy"], [body], [], None, [])  # a stage saved on a GPU, resumed on this CPU
    resume.ProgressFile(path).save({}, {"config": resume.settings(cfg), "tasks": ["toy"], "device": "cuda"})
    with pytest.raises(ValueError, match=r"another run \(device: cuda there\)"):
        resume.LoopProgress(resume.ProgressFile(path))("start", stage)


def _killed_at(monkeypatch, step):
    """Interrupts the run just before its optimizer step `step` (counted in this process) until undone."""
    real_clip, calls = tartan.clip_grad_norm, [0]

    def clip(*args):
        calls[0] += 1
        if calls[0] == step:
            raise _Interrupted
        return real_clip(*args)
    monkeypatch.setattr(tartan, "clip_grad_norm", clip)
    return lambda: monkeypatch.setattr(tartan, "clip_grad_norm", real_clip)


def test_a_resumed_run_may_change_what_changes_no_number(tok, task_dir, tmp_path, monkeypatch):
    """The progress bar, and pre-training configs that an MT run never uses, are not part of what a progress file is
    checked against: a run resumed with them changed continues, to the uninterrupted result."""
    final = tartan.FinetuneConfig(max_steps=4, eval_every=2, batch_size=8)

    def run(progress, pretrain_steps, path=None):
        body, end, aux = build(tok, task_dir)
        torch.manual_seed(0)
        cfg = small_config(False, progress=progress, final_finetune=dataclasses.replace(final, progress=progress))
        pre = [tartan.PretrainConfig(max_steps=pretrain_steps, progress=progress)]
        return _without_seconds(resume.run_end_task(body, end, aux, "mt", cfg, pre, path=path, every=0))
    (tmp_path / "ck").mkdir()
    want, path = run(False, 2), str(tmp_path / "ck" / "run.pt")
    undo = _killed_at(monkeypatch, 3)
    with pytest.raises(_Interrupted):
        run(True, 2, path)
    undo()
    assert os.path.exists(path + ".stage0")
    assert run(False, 3, path) == want and not os.listdir(tmp_path / "ck")


def test_a_progress_file_that_cannot_be_read_starts_its_part_again(tok, task_dir, tmp_path, monkeypatch):
    """A file cut off (a crash, a full disk) is warned about and passed over, not a traceback on every call."""
    run = functools.partial(_short_mt_run, tok, task_dir)
    (tmp_path / "ck").mkdir()
    want, path = run(), str(tmp_path / "ck" / "run.pt")
    undo = _killed_at(monkeypatch, 3)
    with pytest.raises(_Interrupted):
        run(path)
    undo()
    whole = open(path + ".stage0", "rb").read()
    open(path + ".stage0", "wb").write(whole[:len(whole) // 2])
    with pytest.warns(UserWarning, match=r"run.pt.stage0 cannot be read \(RuntimeError: .*this part of the run starts"):
        assert run(path) == want
    assert not os.listdir(tmp_path / "ck")


def test_two_processes_saving_one_progress_file_do_not_tear_it(tmp_path, monkeypatch):
    """While one save is between writing and renaming its file, another process saves the same path: each writes
    its own temporary file, so both land whole (the last rename wins) and neither stops saving."""
    path, real_replace = str(tmp_path / "run.pt"), os.replace

    def meanwhile(src, dst):  # the other process's whole save, just before this one's rename
        monkeypatch.setattr(os, "replace", real_replace)
        resume.ProgressFile(path).save({"by": "other"}, "run")
        real_replace(src, dst)
    monkeypatch.setattr(os, "replace", meanwhile)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a failed save warns
        first = resume.ProgressFile(path)
        first.save({"by": "first"}, "run")
    assert first.every != math.inf and resume.ProgressFile(path).load("run")["by"] == "first"
    assert os.listdir(tmp_path) == ["run.pt"]


def test_progress_files_left_for_a_week_are_noted_by_run_never_removed(tmp_path):
    """A run counts as untouched when none of its files (record, stages) has been saved to for the period; a save
    cut off (.tmp) is not a run's; nothing is removed."""
    def file(name, days_ago, size=1024):
        with open(tmp_path / name, "wb") as f:
            f.truncate(size)  # sparse: the size without the writes
        os.utime(tmp_path / name, (time.time() - days_ago * 86400,) * 2)
    file("a.pt", 9), file("a.pt.stage1", 1)  # a long stage that still saves: a live run
    file(".b.pt.stage0.123.tmp", 30)
    assert resume.untouched(str(tmp_path)) is None
    file("c.pt", 9, 2**29), file("c.pt.stage0", 8, 2**29)
    file("d.pt.stage0", 10, 2**29)
    note = resume.untouched(str(tmp_path))
    assert note.startswith(f"note: {tmp_path} holds the progress files of 2 run(s), 1.5 GiB, not saved to for over "
                           f"7 days (c.pt*, d.pt*): ")  # by run: a.pt, old beside a fresh stage file, is not named
    assert len(list(tmp_path.iterdir())) == 6
