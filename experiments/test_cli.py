"""The command line (reproduce.py): settings from flags, flags that do not apply, help read from tartan's configs,
and result files that stay readable across versions of the runner."""
import os

import pytest
import torch

import reproduce
import tartan
from experiments import runs

# The config stored in a result file and compared on resume, for the flags of the CPU sweep, captured from the
# runner before it was split into experiments/. Result files made with those flags must stay readable by
# --report-only with the same flags: any drift here fails.
SWEEP_FLAGS = ["--task", "aclarc", "--model", "/models/minilm", "--data-dir", "/data", "--seeds", "3", "--device", "cpu",
               "--budget", "cpu", "--no-progress", "--out", "OUT"]
SWEEP_CONFIGS = {'finetune': {'aux': [],
                              'corpora': {},
                              'limit': None,
                              'max_length': 64,
                              'metric': 'macro_f1',
                              'mode': 'finetune',
                              'model': '/models/minilm',
                              'pretrain': [],
                              'seed': 3,
                              'tartan_mode': 'finetune',
                              'task': 'aclarc',
                              'train': {'adam_eps': 1e-06,
                                        'aux_batch_size': 16,
                                        'batch_size': 16,
                                        'betas': [0.9, 0.98],
                                        'bf16': True,
                                        'epochs': 10,
                                        'eval_batch_size': 64,
                                        'eval_every': 50,
                                        'final_finetune': None,
                                        'grad_accum': 1,
                                        'grad_clip': 1.0,
                                        'head_lr': 0.001,
                                        'head_weight_decay': 0.1,
                                        'lr': 0.0001,
                                        'max_steps': 400,
                                        'patience': 4,
                                        'seed': 3,
                                        'warmup_frac': 0.06,
                                        'weight_decay': 0.1,
                                        'weights': None}},
                 'meta': {'aux': ['tapt'],
                          'corpora': {'tapt': 'citation_intent/train.txt'},
                          'limit': None,
                          'max_length': 64,
                          'metric': 'macro_f1',
                          'mode': 'meta',
                          'model': '/models/minilm',
                          'pretrain': [],
                          'seed': 3,
                          'tartan_mode': 'meta',
                          'task': 'aclarc',
                          'train': {'adam_eps': 1e-06,
                                    'aux_batch_size': 16,
                                    'batch_size': 16,
                                    'betas': [0.9, 0.98],
                                    'bf16': True,
                                    'cos_eps': 1e-08,
                                    'epochs': 150,
                                    'eval_batch_size': 64,
                                    'eval_every': 50,
                                    'final_finetune': None,
                                    'grad_accum': 1,
                                    'grad_clip': 1.0,
                                    'head_lr': 0.001,
                                    'head_weight_decay': 0.1,
                                    'lr': 0.0001,
                                    'max_steps': 400,
                                    'meta_batch_size': 16,
                                    'meta_head_lr': 0.001,
                                    'meta_head_steps': 10,
                                    'meta_head_wd': 0.1,
                                    'meta_lr': 0.01,
                                    'patience': 4,
                                    'same_head': False,
                                    'seed': 3,
                                    'warmup_frac': 0.06,
                                    'weight_decay': 0.01,
                                    'weights': None}},
                 'mt': {'aux': ['tapt'],
                        'corpora': {'tapt': 'citation_intent/train.txt'},
                        'limit': None,
                        'max_length': 64,
                        'metric': 'macro_f1',
                        'mode': 'mt',
                        'model': '/models/minilm',
                        'pretrain': [],
                        'seed': 3,
                        'tartan_mode': 'mt',
                        'task': 'aclarc',
                        'train': {'adam_eps': 1e-06,
                                  'aux_batch_size': 16,
                                  'batch_size': 16,
                                  'betas': [0.9, 0.98],
                                  'bf16': True,
                                  'epochs': 150,
                                  'eval_batch_size': 64,
                                  'eval_every': 50,
                                  'final_finetune': None,
                                  'grad_accum': 1,
                                  'grad_clip': 1.0,
                                  'head_lr': 0.001,
                                  'head_weight_decay': 0.1,
                                  'lr': 0.0001,
                                  'max_steps': 400,
                                  'patience': 4,
                                  'seed': 3,
                                  'warmup_frac': 0.06,
                                  'weight_decay': 0.01,
                                  'weights': None}},
                 'tapt': {'aux': ['tapt'],
                          'corpora': {'tapt': 'citation_intent/train.txt'},
                          'limit': None,
                          'max_length': 64,
                          'metric': 'macro_f1',
                          'mode': 'tapt',
                          'model': '/models/minilm',
                          'pretrain': [{'adam_eps': 1e-06,
                                        'aux_batch_size': 16,
                                        'batch_size': 64,
                                        'betas': [0.9, 0.98],
                                        'bf16': True,
                                        'epochs': 100,
                                        'eval_batch_size': 64,
                                        'eval_every': -1,
                                        'final_finetune': None,
                                        'grad_accum': 1,
                                        'grad_clip': 1.0,
                                        'head_lr': 0.0001,
                                        'head_weight_decay': 0.01,
                                        'lr': 0.0001,
                                        'max_steps': 400,
                                        'patience': 20,
                                        'seed': 3,
                                        'warmup_frac': 0.06,
                                        'weight_decay': 0.01,
                                        'weights': None}],
                          'seed': 3,
                          'tartan_mode': 'pretrain',
                          'task': 'aclarc',
                          'train': {'adam_eps': 1e-06,
                                    'aux_batch_size': 16,
                                    'batch_size': 16,
                                    'betas': [0.9, 0.98],
                                    'bf16': True,
                                    'epochs': 10,
                                    'eval_batch_size': 64,
                                    'eval_every': 50,
                                    'final_finetune': None,
                                    'grad_accum': 1,
                                    'grad_clip': 1.0,
                                    'head_lr': 0.001,
                                    'head_weight_decay': 0.1,
                                    'lr': 0.0001,
                                    'max_steps': 400,
                                    'patience': 4,
                                    'seed': 3,
                                    'warmup_frac': 0.06,
                                    'weight_decay': 0.1,
                                    'weights': None}}}


@pytest.mark.parametrize("mode", ["finetune", "tapt", "mt", "meta"])
def test_sweep_config_and_path_are_unchanged(mode):
    parser, _ = reproduce.build_parser()
    settings = reproduce.make_settings(parser.parse_args(SWEEP_FLAGS + ["--mode", mode]), {})
    run = runs.make_run("aclarc", mode, None, 3, "10x")
    assert run.path("OUT") == os.path.join("OUT", "aclarc", f"{mode}__{'none' if mode == 'finetune' else 'tapt'}"
                                           f"__seed3.json")
    assert runs.Workspace(settings, torch.device("cpu")).config(run) == SWEEP_CONFIGS[mode]


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
    (["--figure", "3", "--mode", "meta"], "--mode does not apply to --figure 3"),
    (["--task", "demo", "--lr", "0.1"], "--lr does not apply to --task demo"),
    (["--task", "demo", "--model", "m"], "--model does not apply to --task demo"),
    (["--bench", "--lr", "0.1"], "--lr does not apply to --bench"),
    (["--bench", "--budget", "cpu"], "--budget does not apply to --bench"),
    (["--task", "aclarc", "--mode", "mt", "--bench-steps", "3"], "--bench-steps does not apply to --mode mt"),
    (["--task", "aclarc", "--mode", "mt", "--default-malloc"], "--default-malloc does not apply to --mode mt"),
    (["--task", "aclarc", "--mode", "mt", "--steps", "0"], "--steps must be at least 1"),
    (["--bench", "--table", "1"], "choose one of"),
])
def test_a_flag_that_does_not_apply_is_an_error_naming_flag_and_mode(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        reproduce.main(argv)
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_flags_that_apply_to_some_column_of_a_table_are_accepted():
    parser, scope = reproduce.build_parser()
    for argv in (["--table", "1", "--meta-lr", "0.1"], ["--table", "2", "--pretrain-steps", "3"],
                 ["--task", "aclarc", "--mode", "tapt", "mt", "--pretrain-lr", "1e-5"],
                 ["--bench", "--batch-size", "8", "--meta-batch-size", "4", "--quick"]):
        args = parser.parse_args(argv)
        reproduce._check_flags(parser, args, scope, *reproduce._command(parser, args))  # no SystemExit


def test_help_shows_the_paper_defaults_read_from_tartans_configs(capsys):
    with pytest.raises(SystemExit):
        reproduce.main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    mt, eq2, meta = tartan.TrainConfig(), tartan.FinetuneConfig(), tartan.MetaConfig()
    assert f"(MT/META {mt.lr:g}, Eq. 2 {eq2.lr:g})" in text
    assert f"(paper {meta.meta_lr:g}; vision" in text
    assert f"final Eq. 2 after MT/META: body learning rate (final {tartan.tartan_finetune().lr:g})" in text
    assert "benchmark (--bench;" in text and "--bench-steps" in text and "--default-malloc" in text
