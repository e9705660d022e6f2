"""The paper's experiments as data: end-tasks, tables and their columns, the paper's numbers, figures, and the
budgets (the vision setup, --quick, --budget)."""
from __future__ import annotations

from dataclasses import dataclass



TASKS = {  # name -> upstream folder, display name, domain, headline metric (Table 1 caption; App. A.4: accuracy)
    "aclarc": dict(folder="citation_intent", title="ACL-ARC", domain="CS", metric="macro_f1"),
    "scierc": dict(folder="sciie", title="SCIERC", domain="CS", metric="macro_f1"),
    "chemprot": dict(folder="chemprot", title="CHEMPROT", domain="BIOMED", metric="micro_f1"),
    "hyperpartisan": dict(folder="hyperpartisan", title="HYPERPARTISAN", domain="NEWS", metric="macro_f1"),
    "mammals": dict(folder="cifar-100", title="Medium-Sized Mammals", domain="CIFAR-100", metric="accuracy"),
}
# The modes (--mode) and what each runs. finetune: Eq. 2 alone. Eq. 1 on auxiliary data, then Eq. 2: tapt, dapt and
# dapt+tapt on the task's / domain text, pretrain on CIFAR-100's other 95 classes. TARTAN: mt (Eq. 3), meta
# (Algorithm 1, meta head phi*) and meta-samehead (the end-task head phi', Eq. 6, Fig. 3).
PRETRAIN_TEXT_MODES = ("tapt", "dapt", "dapt+tapt")
PRETRAIN_MODES = PRETRAIN_TEXT_MODES + ("pretrain",)
META_MODES = ("meta", "meta-samehead")
TARTAN_MODES = ("mt",) + META_MODES
WITH_AUX = PRETRAIN_MODES + TARTAN_MODES  # every mode that trains on auxiliary data
TEXT_MODES = ("finetune",) + PRETRAIN_TEXT_MODES + TARTAN_MODES
VISION_MODES = ("finetune", "pretrain") + TARTAN_MODES
DAPT_FILES = {"1x": "domain.1xTAPT.txt", "10x": "domain.10xTAPT.txt", "full": "domain.full.txt"}


@dataclass(frozen=True)
class Column:
    label: str                 # the paper's column name
    mode: str                  # --mode
    aux: str | None = None     # --aux for mt/meta


@dataclass(frozen=True)
class Table:
    title: str
    tasks: tuple[str, ...]
    columns: tuple[Column, ...]
    baseline: tuple[str, ...] = ()   # p-values against this column (or the better-mean one of several, Table 8)
    baseline_name: str = ""          # how the p-value columns name the baseline
    seeds: int = 10                  # the paper's number of seeds
    dapt: str = "10x"                # DAPT corpus: n = 10 x |Train| (Table 2), or the full corpus (Table 3)
    note: str = ""


TAPT_COLS = (Column("TAPT", "tapt"), Column("MT-TARTAN", "mt", "tapt"), Column("META-TARTAN", "meta", "tapt"))
TABLES = {
    1: Table("Table 1 (p-values: Table 6). End-task aware training with TAPT as the auxiliary task",
             ("aclarc", "scierc", "chemprot"), (Column("RoBERTa", "finetune"),) + TAPT_COLS, baseline=("TAPT",)),
    7: Table("Table 7. HYPERPARTISAN", ("hyperpartisan",), (TAPT_COLS[0], TAPT_COLS[2]), baseline=("TAPT",)),
    2: Table("Table 2 (p-values: Table 8). DAPT at n = 10 x |Train|; TARTAN uses DAPT and TAPT",
             ("aclarc", "scierc", "chemprot"),
             (Column("DAPT", "dapt"), Column("DAPT+TAPT", "dapt+tapt"), Column("MT-TARTAN", "mt", "dapt+tapt"),
              Column("META-TARTAN", "meta", "dapt+tapt")), baseline=("DAPT", "DAPT+TAPT"),
             baseline_name="max(DAPT, DAPT+TAPT)",
             note="DAPT at n = 10 x |Train| has no released checkpoint: DAPT and DAPT+TAPT are re-trained with Eq. 1."),
    3: Table("Table 3. DAPT and DAPT+TAPT on all domain data", ("aclarc", "scierc", "chemprot"),
             (Column("DAPT_full", "dapt"), Column("+TAPT_full", "dapt+tapt")), dapt="full",
             note="With roberta-base the columns fine-tune Gururangan et al.'s released checkpoints (cs_roberta_base, "
                  "biomed_roberta_base, dsp_roberta_base_dapt_*_tapt_*), as the paper did. Re-training them "
                  "(--baselines retrain, or another body) needs the full DAPT corpora (S2ORC: 8.10B tokens CS, 7.55B "
                  "BIOMED), which are not public: then it runs on whatever domain text is given (domain.full.txt "
                  "placed by hand in each task folder, or --dapt-corpus) and is not the paper's experiment unless "
                  "that text is."),
    4: Table("Table 4. Only DAPT (n = 10 x |Train|) as the auxiliary task", ("aclarc", "scierc", "chemprot"),
             (Column("MT", "mt", "dapt"), Column("META", "meta", "dapt")), baseline=("MT",), seeds=3),
    5: Table("Table 5 (App. A.4). CIFAR-100 medium-sized mammals, the other 95 classes as auxiliary task",
             ("mammals",), (Column("Regular (Task-Agnostic) Pre-training", "pretrain"), Column("MT-TARTAN", "mt"),
                            Column("META-TARTAN", "meta")), baseline=("Regular (Task-Agnostic) Pre-training",),
             baseline_name="pre-training", seeds=3),
}
PAPER = {  # (table, task, column) -> (mean, std, p-value vs the baseline column or None); test set, x100
    (1, "aclarc", "RoBERTa"): (66.03, 3.55, None), (1, "aclarc", "TAPT"): (67.74, 3.68, None),
    (1, "aclarc", "MT-TARTAN"): (70.48, 4.42, 0.040), (1, "aclarc", "META-TARTAN"): (70.08, 4.70, 0.069),
    (1, "scierc", "RoBERTa"): (77.96, 2.96, None), (1, "scierc", "TAPT"): (79.53, 1.93, None),
    (1, "scierc", "MT-TARTAN"): (80.81, 0.74, 0.038), (1, "scierc", "META-TARTAN"): (81.48, 0.82, 0.005),
    (1, "chemprot", "RoBERTa"): (82.10, 0.98, None), (1, "chemprot", "TAPT"): (82.17, 0.65, None),  # Table 6: 0.065
    (1, "chemprot", "MT-TARTAN"): (84.29, 0.63, 0.000), (1, "chemprot", "META-TARTAN"): (84.49, 0.50, 0.000),
    (7, "hyperpartisan", "TAPT"): (93.39, 2.26, None), (7, "hyperpartisan", "META-TARTAN"): (96.84, 1.72, 0.003),
    (2, "aclarc", "DAPT"): (68.60, 2.62, None), (2, "aclarc", "DAPT+TAPT"): (69.12, 5.76, None),
    (2, "aclarc", "MT-TARTAN"): (71.58, 1.65, 0.110), (2, "aclarc", "META-TARTAN"): (71.05, 2.37, 0.174),
    (2, "scierc", "DAPT"): (76.44, 1.19, None), (2, "scierc", "DAPT+TAPT"): (77.62, 1.38, None),
    (2, "scierc", "MT-TARTAN"): (81.02, 1.24, 0.000), (2, "scierc", "META-TARTAN"): (81.41, 1.70, 0.000),
    (2, "chemprot", "DAPT"): (80.76, 0.54, None), (2, "chemprot", "DAPT+TAPT"): (78.22, 0.74, None),
    (2, "chemprot", "MT-TARTAN"): (83.77, 0.60, 0.000), (2, "chemprot", "META-TARTAN"): (83.38, 0.89, 0.000),
    (3, "aclarc", "DAPT_full"): (72.49, 3.28, None), (3, "aclarc", "+TAPT_full"): (73.79, 1.75, None),
    (3, "scierc", "DAPT_full"): (79.97, 2.11, None), (3, "scierc", "+TAPT_full"): (80.00, 1.08, None),
    (3, "chemprot", "DAPT_full"): (86.54, 1.05, None), (3, "chemprot", "+TAPT_full"): (87.24, 0.81, None),
    (4, "aclarc", "MT"): (69.27, 0.96, None), (4, "aclarc", "META"): (71.19, 4.88, None),
    (4, "scierc", "MT"): (81.53, 0.99, None), (4, "scierc", "META"): (82.08, 1.19, None),
    (4, "chemprot", "MT"): (80.26, 3.79, None), (4, "chemprot", "META"): (82.31, 0.75, None),
    (5, "mammals", "Regular (Task-Agnostic) Pre-training"): (46.7, 2.2, None),
    (5, "mammals", "MT-TARTAN"): (51.3, 1.2, None), (5, "mammals", "META-TARTAN"): (52.3, 3.8, None),
}
FIGURES = {  # figure -> (title, tasks, seeds); the runs are listed in figure_runs()
    2: ("Figure 2. Data efficiency: DAPT vs META-TARTAN (DAPT only) at n = 1x and 10x |Train|",
        ("aclarc", "scierc"), 3),
    3: ("Figure 3. Task weights of META-TARTAN on ACL-ARC with DAPT: separate meta head phi* vs the same head phi'",
        ("aclarc",), 3),
    4: ("Figure 4. Task weights of META-TARTAN with DAPT and TAPT across end-tasks",
        ("aclarc", "scierc", "chemprot"), 3),
}
N_PERMUTATIONS = 10_000  # App. A.2
PAPER_BODY = "roberta-base"  # Sec. 4: the shared body theta_body
# Sec. 4: "For DAPT and TAPT, we download the available pre-trained model bases provided by Gururangan et al. (2020)":
# their roberta-base checkpoints on the Hugging Face Hub, fine-tuned with Eq. 2. Keys: (mode, auxiliary corpora of the
# run, in order). DAPT here is the full domain corpus (Table 3); DAPT at n = 10 x |Train| (Table 2) has no release.
_DSP = "allenai/dsp_roberta_base_"
_TAPT_N = {"aclarc": "citation_intent_1688", "scierc": "sciie_3219", "chemprot": "chemprot_4169",
           "hyperpartisan": "hyperpartisan_news_515"}
_DOMAIN = {"aclarc": "cs", "scierc": "cs", "chemprot": "biomed", "hyperpartisan": "news"}
RELEASED = {
    **{(task, "tapt", ("tapt",)): f"{_DSP}tapt_{n}" for task, n in _TAPT_N.items()},
    **{(task, "dapt", ("daptfull",)): f"allenai/{d}_roberta_base" for task, d in _DOMAIN.items()},
    **{(task, "dapt+tapt", ("daptfull", "tapt")): f"{_DSP}dapt_{_DOMAIN[task]}_tapt_{n}" for task, n in _TAPT_N.items()},
}
PAPER_MAX_LENGTH = 512   # tokens per example (release; the paper gives no length)

# The vision experiment's training: the task is App. A.4's, Adam is Sec. 4's, the rest (lr, batch, 30 epochs; the
# meta head's lr 3e-2, not the text's 1e-3) is the release's. Neither gives a schedule: the text one stays
# (6% warm-up, linear decay, clipping at 1.0; tartan.TrainConfig).
VISION = dict(lr=3e-4, head_lr=3e-4, weight_decay=0.0, head_weight_decay=0.0, betas=(0.9, 0.999), adam_eps=1e-8,
              batch_size=64, aux_batch_size=64, grad_accum=1, epochs=30, eval_every=0, patience=30)
VISION_META = dict(meta_lr=5e-2, meta_head_lr=3e-2, meta_head_wd=0.1, meta_head_steps=10, meta_batch_size=16)
# --quick: a tiny smoke budget, not the paper's experiment.
QUICK = {"max_length": 64, "limit": 64,
         "train": dict(max_steps=4, eval_every=2, patience=2, batch_size=8, aux_batch_size=8, grad_accum=1,
                       meta_batch_size=8, eval_batch_size=32),
         "pretrain": dict(max_steps=2, aux_batch_size=8, grad_accum=1),
         "final": dict(max_steps=2, eval_every=1, patience=1, batch_size=8, grad_accum=1, eval_batch_size=32)}
# Named reduced budgets (--budget). cpu: a small pretrained body (all-MiniLM-L6-v2 size) on a CPU. Every end-task stage
# stops early on dev within its step cap; "eq2" holds the learning rates of the Eq. 2 stages (finetune, and the
# fine-tuning after TAPT/DAPT), chosen on dev (experiments/results/README.md, "How each column's budget was chosen");
# "final": None = no final fine-tuning after MT/META. Flags given beside --budget override single values.
BUDGETS = {"cpu": {"max_length": 64,
                   "train": dict(batch_size=16, aux_batch_size=16, grad_accum=1, max_steps=400, eval_every=50,
                                 patience=4, meta_batch_size=16, eval_batch_size=64),
                   "eq2": dict(lr=1e-4, head_lr=1e-3),
                   "pretrain": dict(max_steps=400, aux_batch_size=16, grad_accum=1),
                   "final": None},
           # cpu-es: the same body and batches, but every end-task stage ends by early stopping on dev, as the paper's
           # MT does (Sec. 3.1) and the release's runs do: the release's schedule shape (warm-up over 6% of the
           # schedule, then linear decay) over a cap no run is meant to reach, dev every 50 steps, patience 8
           # evaluations; the final fine-tune after MT/META on (release: lr 5e-6, kept only if dev improves); TAPT's
           # Eq. 1 stage as many MLM batches as the longest MT run is expected to see; max length 128 (64 cuts 25% of
           # ACL-ARC's and 10% of SCIERC's examples, 128 cuts 3% and under 1%); the test split scored at every
           # evaluation for learning curves only; one warmed MLM head for every arm (the offline body has none).
           "cpu-es": {"max_length": 128,
                      "train": dict(batch_size=16, aux_batch_size=16, grad_accum=1, max_steps=4000, eval_every=50,
                                    patience=8, meta_batch_size=16, eval_batch_size=64, eval_test=True),
                      "eq2": dict(lr=1e-4, head_lr=1e-3),
                      "pretrain": dict(max_steps=2000, aux_batch_size=16, grad_accum=1),
                      "final": dict(batch_size=16, grad_accum=1, max_steps=4000, eval_every=50, patience=8,
                                    eval_batch_size=64, eval_test=True),
                      "warm_head": dict(steps=300, lr=1e-3, batch_size=16)}}
# A checkpoint without an LM head (e.g. a sentence-embedding model) gets one fitted on the task's own text, body frozen,
# before TAPT, MT or META use it (models.warm_mlm_head); roberta-base has its LM head, and then nothing changes.
PAPER_WARM_HEAD = dict(steps=300, lr=1e-3, batch_size=16)


def metric_field(metric: str) -> str:
    """The key of a task's headline metric in tartan.evaluate's scores: App. A.4's accuracy is micro-F1 there (one
    label per example)."""
    return "micro_f1" if metric == "accuracy" else metric


def tartan_mode(mode: str) -> str:
    """The mode of tartan.run_end_task that runs a --mode: the Eq. 1 modes are its "pretrain", meta-samehead is
    "meta" (the head is a setting of MetaConfig)."""
    return "pretrain" if mode in PRETRAIN_MODES else "meta" if mode in META_MODES else mode
