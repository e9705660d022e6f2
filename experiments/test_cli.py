"""The command line (reproduce.py): settings from flags, flags that do not apply, help read from tartan's configs,
and result files that stay readable across versions of the runner."""
import dataclasses
import os

import pytest
import torch

import reproduce
import tartan
from experiments import flags, paper, runs

# The committed result files of the CPU sweep (experiments/results/README.md), each with the flags that made
# it. Today's runner must build the very config stored in each file (the one compared on resume), or --report-only
# could no longer re-print the committed tables: any drift fails here.
SWEEP = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "cpu")
SWEEP_FILES = sorted(os.path.join(task, f) for task in os.listdir(SWEEP) if os.path.isdir(os.path.join(SWEEP, task))
                     for f in os.listdir(os.path.join(SWEEP, task)) if f.endswith(".json"))


def test_the_sweep_is_committed():
    assert len(SWEEP_FILES) == 4 * 5 + 4 * 3  # ACL-ARC seeds 0-4 and SCIERC seeds 0-2, four modes each


@pytest.mark.parametrize("name", SWEEP_FILES)
def test_sweep_config_and_path_are_unchanged(name):
    stored = runs.load_result(os.path.join(SWEEP, name))["config"]  # as the runner reads it (older bf16 meaning)
    task, mode, seed = stored["task"], stored["mode"], stored["seed"]
    flags = ["--task", task, "--mode", mode, "--seeds", str(seed), "--model", stored["model"], "--data-dir", "/data",
             "--device", "cpu", "--budget", "cpu", "--no-progress", "--out", "OUT"]
    settings = reproduce.make_settings(reproduce.build_parser()[0].parse_args(flags), {})
    run = runs.make_run(task, mode, None, seed, "10x")
    assert run.path("OUT") == os.path.join("OUT", name)
    assert runs.Workspace(settings, torch.device("cpu")).config(run) == stored


RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
ALL_FILES = sorted(os.path.relpath(os.path.join(root, f), RESULTS) for root, _, files in os.walk(RESULTS)
                   for f in files if f.endswith(".json") and "__seed" in f)


@pytest.mark.parametrize("name", ALL_FILES)
def test_every_committed_result_is_the_config_its_recorded_command_builds(name):
    """Every committed result file (every budget, the diagnostics and grids included), re-parsed from the command it
    records: today's runner builds the very config stored, so each resumes and re-prints as it is."""
    rec = runs.load_result(os.path.join(RESULTS, name))  # as the runner reads it (older bf16 meaning)
    args = reproduce.build_parser()[0].parse_args(rec["command"][1:])
    run = runs.make_run(rec["key"]["task"], rec["key"]["mode"], args.aux, rec["key"]["seed"], "10x")
    assert run.path(os.path.dirname(os.path.dirname(name))) == name
    settings = reproduce.make_settings(args, {})
    assert runs.Workspace(settings, torch.device("cpu")).config(run) == rec["config"]


@pytest.mark.parametrize("argv, message", [
    (["--task", "aclarc", "--mode", "mt", "--meta-lr", "0.1"], "--meta-lr does not apply to --mode mt (it applies "
                                                               "to --mode meta, meta-samehead)"),
    (["--task", "aclarc", "--mode", "finetune", "--pretrain-steps", "3"], "--pretrain-steps does not apply to --mode "
                                                                          "finetune"),
    (["--task", "aclarc", "--mode", "meta", "--budget", "cpu", "--final-lr", "1e-5"],
     "--final-lr does not apply to --budget cpu (it has no final fine-tuning)"),
    (["--table", "4", "--pretrain-lr", "1e-5"], "--pretrain-lr does not apply to --table 4"),
    (["--table", "1", "--aux", "dapt"], "--aux does not apply to --table 1"),
    (["--table", "1", "--aux-file", "x.txt"], "--aux-file does not apply to --table 1"),
    (["--table", "1", "--dapt-corpus", "1x"], "--dapt-corpus does not apply to --table 1: no run of it reads DAPT"),
    (["--task", "aclarc", "--mode", "finetune", "tapt", "--dapt-corpus", "1x"], "--dapt-corpus does not apply to "
                                                                                "--mode finetune tapt: no run"),
    (["--task", "aclarc", "--mode", "mt", "--dapt-corpus", "1x"], "--dapt-corpus does not apply to --mode mt --aux "
                                                                  "tapt: no run of it reads DAPT text"),
    (["--figure", "3", "--mode", "meta"], "--mode does not apply to --figure 3"),
    (["--task", "demo", "--lr", "0.1"], "--lr does not apply to --task demo"),
    (["--task", "demo", "--model", "m"], "--model does not apply to --task demo"),
    (["--bench", "--lr", "0.1"], "--lr does not apply to --bench"),
    (["--bench", "--budget", "cpu"], "--budget does not apply to --bench"),
    (["--task", "aclarc", "--mode", "finetune", "--meta-head-data", "train"], "--meta-head-data does not apply to "
     "--mode finetune"),
    (["--task", "aclarc", "--mode", "mt", "--bench-steps", "3"], "--bench-steps does not apply to --mode mt"),
    (["--task", "aclarc", "--mode", "mt", "--default-malloc"], "--default-malloc does not apply to --mode mt"),
    (["--task", "aclarc", "--mode", "mt", "--steps", "0"], "--steps must be at least 1"),
    (["--bench", "--table", "1"], "choose one of"),
    (["--task", "aclarc", "--mode", "finetune", "--mode", "tapt"], "--mode is given twice: give it once"),
    (["--task", "aclarc", "--mode", "mt", "--seed", "1", "--seeds", "2"], "unrecognized arguments: --seed 1"),
    (["--task", "aclarc", "--mode", "mt", "--shard", "0/2", "--shard=1/2"], "--shard is given twice"),
    (["--task", "aclarc", "--mode", "mt", "--no-progress", "--no-progress"], "--no-progress is given twice"),
    (["--task", "aclarc", "--mode", "mt", "--out", ""], "--out is empty: give a folder"),
    (["--task", "aclarc", "--mode", "mt", "--model", " "], "--model is empty: give a folder or a Hub id"),
    (["--task-dir", "d", "--mode", "mt", "--save-model", ""], "--save-model is empty: give a folder"),
    (["--task", "aclarc", "--mode", "mt", "--seeds", "3-1"], "'3-1': a range from high to low"),
    (["--task", "aclarc", "--mode", "mt", "--seeds", "4294967296"], "seeds run from 0 to 2**32 - 1, at most 10000"),
    (["--task", "aclarc", "--mode", "mt", "--seeds", "0-999999999"], "seeds run from 0 to 2**32 - 1, at most 10000"),
    (["--task", "aclarc", "--mode", "mt", "--seeds", "0-4999,5000-10000"], "at most 10000 of them"),
    (["--task", "aclarc", "--mode", "mt", "--seeds", "1_0"], "'1_0' is not a seed list"),
    (["--task", "aclarc", "--mode", "mt", "--seeds", "\u0661"], "is not a seed list"),  # an Arabic-Indic one
    (["--task", "aclarc", "--mode", "mt", "--aux-file", "/dev/null"], "--aux-file /dev/null: not a regular file"),
])
def test_a_flag_that_does_not_apply_is_an_error_naming_flag_and_mode(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        reproduce.main(argv)
    err = capsys.readouterr().err
    # the message, then where the options are: not argparse's usage block of every flag above it
    assert e.value.code == 2 and err == f"reproduce.py: error: {err.split('error: ', 1)[1]}"
    assert message in err and err.endswith("\n(python reproduce.py --help lists the options)\n")


@pytest.mark.parametrize("argv", [["--task", "aclarc", "--mode", "finetune"], ["--task", "demo"], ["--bench"]])
def test_out_that_is_a_file_is_refused_before_anything_runs(argv, tmp_path, capsys):
    (tmp_path / "results").write_text("")
    with pytest.raises(SystemExit) as e:
        reproduce.main(argv + ["--out", str(tmp_path / "results")])
    assert e.value.code == 2 and f"--out {tmp_path / 'results'}: a file, not a folder" in capsys.readouterr().err


def test_data_dir_that_is_a_file_a_task_dir_given_twice_and_a_missing_diagnostics_folder(tmp_path, capsys):
    (tmp_path / "data").write_text("")
    with pytest.raises(SystemExit) as e:
        reproduce.main(["--task", "aclarc", "--mode", "finetune", "--data-dir", str(tmp_path / "data")])
    assert e.value.code == 2 and f"--data-dir {tmp_path / 'data'}: a file, not a folder" in capsys.readouterr().err
    mine = tmp_path / "my_task"
    mine.mkdir()
    for split in ("train", "dev", "test"):
        (mine / f"{split}.jsonl").write_text('{"text": "a", "label": "x"}\n')
    assert reproduce.main(["--task-dir", str(mine), "--task-dir", str(mine), "--mode", "finetune"]) == 1
    assert f"error: --task-dir {mine} is given twice: give each folder once" in capsys.readouterr().err
    assert reproduce.main(["--diagnostics", str(tmp_path / "none")]) == 1
    assert f"--diagnostics {tmp_path / 'none'}: no such folder" in capsys.readouterr().err


def test_a_flag_written_with_its_default_value_is_checked_too(capsys):
    """Checked without reproduce.main: were the check gone, main would start the benchmark."""
    parser, scope = reproduce.build_parser()
    argv = ["--bench", "--model", "roberta-base"]  # --model's default, which --bench does not read
    args = parser.parse_args(argv)
    with pytest.raises(SystemExit) as e:
        reproduce._check_flags(parser, args, scope, *reproduce._command(parser, args), reproduce._given(argv))
    assert e.value.code == 2 and "--model does not apply to --bench" in capsys.readouterr().err
    assert reproduce._given(argv) == {"bench", "model"} and reproduce._given(["--bench"]) == {"bench"}


def test_flags_that_apply_to_some_column_of_a_table_are_accepted():
    parser, scope = reproduce.build_parser()
    for argv in (["--table", "1", "--meta-lr", "0.1"], ["--table", "2", "--pretrain-steps", "3"],
                 ["--task", "aclarc", "--mode", "tapt", "mt", "--pretrain-lr", "1e-5"],
                 ["--table", "2", "--mode", "dapt", "--dapt-corpus", "1x"],
                 ["--task", "aclarc", "--mode", "finetune", "dapt+tapt", "--dapt-corpus", "1x"],
                 ["--task", "aclarc", "--mode", "meta", "--aux", "dapt", "--dapt-corpus", "1x"],
                 ["--bench", "--batch-size", "8", "--meta-batch-size", "4", "--quick"]):
        args = parser.parse_args(argv)
        command, named, modes = reproduce._command(parser, args)
        reproduce._check_flags(parser, args, scope, command, named, modes, reproduce._given(argv))
        reproduce._check_combinations(parser, args, command, modes)


def test_the_default_data_folder_is_under_tartan_cache(monkeypatch):
    """Downloads go where the runs' progress files and warmed heads go, so one variable moves all of them."""
    monkeypatch.setenv("TARTAN_CACHE", "/scratch/me/tartan")
    assert reproduce.build_parser()[0].get_default("data_dir") == os.path.join("/scratch/me/tartan", "data")


def test_help_shows_the_defaults_read_from_tartans_configs(capsys):
    with pytest.raises(SystemExit):
        reproduce.main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    mt, eq2, meta = tartan.TrainConfig(), tartan.FinetuneConfig(), tartan.MetaConfig()
    assert f"(MT/META {mt.lr:g}, Eq. 2 {eq2.lr:g})" in text
    assert f"(default {meta.meta_lr:g}; vision" in text
    assert f"(release {paper.PAPER_MAX_LENGTH}; bench" in text  # the paper gives no length
    assert f"final Eq. 2 after MT/META: body learning rate (final {tartan.tartan_finetune().lr:g})" in text
    assert f"Eq. 1: MLM head learning rate (Eq. 1 {tartan.PretrainConfig().head_lr:g})" in text
    assert "benchmark (--bench;" in text and "--bench-steps" in text and "--default-malloc" in text


def test_every_flag_has_one_row_and_config_flags_apply_to_the_modes_that_run_their_stage():
    """experiments.flags.FLAGS is the one table of what a flag applies to: every flag of the parser has its row."""
    _, scope = reproduce.build_parser()
    assert set(scope) == set(flags.FLAGS)
    only = {("pretrain",): paper.PRETRAIN_MODES, ("final",): paper.TARTAN_MODES}  # a stage that not every mode runs
    for dest, flag in flags.CONFIG_FLAGS.items():
        assert scope[dest][0] == flags.option(dest)
        assert flag.modes == only.get(flag.stages, flag.modes)
    assert [d for d, flag in flags.CONFIG_FLAGS.items() if flag.stages in only] == [
        "pretrain_epochs", "pretrain_steps", "pretrain_lr", "pretrain_head_lr",
        "final_epochs", "final_steps", "final_lr", "final_head_lr"]


@pytest.mark.parametrize("mode, overrides, message", [
    ("finetune", {"batch_size": 0}, "--batch-size 0: must be a number of at least 1 (the end-task stage of aclarc "
                                    "finetune seed 0)"),
    ("mt", {"final_lr": -1.0}, "--final-lr -1.0: must be a number of at least 0 (the final Eq. 2 stage of aclarc mt "
                               "aux=tapt seed 0)"),
    ("tapt", {"pretrain_head_lr": -1.0}, "--pretrain-head-lr -1.0: must be a number of at least 0 (the Eq. 1 stage"),
    ("meta", {"epochs": 0.0}, "--epochs 0.0: must be above 0 (or set --steps)"),
    ("meta", {"meta_batch_size": 8, "batch_size": 4}, "--meta-batch-size 8 > --batch-size 4: "),
    ("meta", {"meta_batch_size": 8, "batch_size": 4}, "set --meta-head-data dev (the end-task stage of aclarc meta"),
])
def test_tartans_config_check_refuses_in_the_words_of_the_command_line(mode, overrides, message):
    run = runs.make_run("aclarc", mode, None, 0, "10x")
    with pytest.raises(reproduce.ReproduceError) as e:
        runs.check_configs(runs.Budget(overrides=overrides), [run])
    assert message in str(e.value)


def test_an_epochs_flag_where_the_stage_counts_steps_is_refused():
    """--epochs beside --quick, a budget or --steps did nothing (tartan.train counts max_steps once it is set), yet
    went into the config, so a rerun without it was refused as another config; --final-* beside --no-final-finetune
    did nothing either, and so did --patience where the stage never evaluates. Where no step count is set, --epochs
    applies."""
    run, mt = runs.make_run("aclarc", "finetune", None, 0, "10x"), runs.make_run("aclarc", "mt", None, 0, "10x")
    for budget, what in [(runs.Budget(quick=True, overrides={"epochs": 7.0}), "--epochs does not apply to the "
                          "end-task stage of aclarc finetune seed 0: its steps are set (4, by --quick"),
                         (runs.Budget(overrides={"epochs": 3.0, "steps": 9}), "its steps are set (9, by"),
                         (runs.Budget(name="cpu-es", overrides={"final_epochs": 2.0}), "--final-epochs does not "
                          "apply to the final Eq. 2 stage of aclarc mt"),
                         (runs.Budget(overrides={"eval_every": -1, "patience": 3}), "--patience does not apply to the "
                          "end-task stage of aclarc finetune seed 0: it never evaluates")]:
        with pytest.raises(reproduce.ReproduceError, match=what.replace("(", "\\(")):
            runs.check_configs(budget, [run, mt])
    runs.check_configs(runs.Budget(overrides={"epochs": 3.0, "final_epochs": 2.0}), [run, mt])
    with pytest.raises(reproduce.ReproduceError, match="--final-lr does not apply beside --no-final-finetune"):
        runs.check_configs(runs.Budget(overrides={"final_lr": 0.5}, no_final_finetune=True), [run, mt])
    runs.check_configs(runs.Budget(overrides={"batch_size": 8}, no_final_finetune=True), [run, mt])  # train's too
    runs.check_configs(runs.Budget(overrides={"eval_every": 5, "patience": 3}), [run, mt])  # evaluated: it applies


def test_the_papers_settings_and_every_budget_pass_tartans_config_check():
    fits = [runs.Budget(overrides={"meta_batch_size": 8, "batch_size": 4, "meta_head_data": "dev"})]
    for budget in [runs.Budget(), runs.Budget(quick=True), *fits] + [runs.Budget(name=n) for n in paper.BUDGETS]:
        runs.check_configs(budget, [runs.make_run(task, mode, None, 0, "10x") for task in ("aclarc", "mammals")
                                    for mode in (paper.VISION_MODES if task == "mammals" else paper.TEXT_MODES)])


def test_an_aux_file_that_is_a_folder_is_named_so(tmp_path, capsys):
    """--aux-file given a folder said "no such file"."""
    with pytest.raises(SystemExit):
        reproduce.main(["--task", "aclarc", "--mode", "mt", "--aux-file", str(tmp_path)])
    assert f"--aux-file {tmp_path}: a folder, not a file" in capsys.readouterr().err


def test_quick_and_a_budget_together_are_refused():
    """--quick --budget cpu ran a mix of the two (the budget's steps and batch, --quick's example limit and no warmed
    head) that neither documents."""
    with pytest.raises(reproduce.ReproduceError, match="--quick and --budget cpu both set the run's size: give one"):
        runs.Budget(quick=True, name="cpu")


def test_an_eq1_flag_where_a_released_checkpoint_stands_for_eq1_is_refused():
    """--pretrain-* flags for a TAPT run that Gururangan et al.'s released checkpoint serves did nothing (no Eq. 1
    stage ran, no word); with --baselines retrain, or beside a run that trains its Eq. 1 stage, they apply."""
    tapt, dapt = runs.make_run("aclarc", "tapt", None, 0, "10x"), runs.make_run("aclarc", "dapt", None, 0, "1x")
    released = runs.Settings("roberta-base", "data", "out", runs.Budget(overrides={"pretrain_lr": 0.5}),
                             baselines="auto")
    with pytest.raises(reproduce.ReproduceError, match="--pretrain-lr does not apply: the released checkpoint "
                                                       "allenai/dsp_roberta_base_tapt_citation_intent_1688 stands for "
                                                       "the Eq. 1 stage of aclarc tapt"):
        runs.check_released(released, [tapt])
    runs.check_released(dataclasses.replace(released, baselines="retrain"), [tapt])
    runs.check_released(released, [tapt, dapt])  # the 1x DAPT corpus has no released checkpoint: trained here


def test_ctrl_c_while_the_command_line_starts_is_one_line_not_a_traceback(tmp_path):
    """SIGINT once torch's library loads, while torch and transformers are still being imported (a second or more
    here); later, main handles it the same way."""
    import signal
    import subprocess
    import sys
    import time
    script = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "reproduce.py")
    # SIGINT at its default whatever the suite inherited (a suite started as a background job `&` has it ignored)
    p = subprocess.Popen([sys.executable, script, "--task", "demo", "--out", str(tmp_path)], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    for _ in range(600):  # Linux: until torch's library is being loaded (30 s at most)
        try:
            with open(f"/proc/{p.pid}/maps") as f:
                if "torch" in f.read():
                    break
        except OSError:  # no /proc to watch: half a second in
            time.sleep(0.5)
            break
        time.sleep(0.05)
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 130 and err.strip() == "interrupted" and "Traceback" not in err
    # a job started with SIGINT ignored (a shell's background job: `... &`) keeps ignoring it
    p = subprocess.Popen([sys.executable, script, "--help"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    time.sleep(0.5)
    p.send_signal(signal.SIGINT)
    out, _ = p.communicate(timeout=120)
    assert p.returncode == 0 and "usage: reproduce.py" in out
