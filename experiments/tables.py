"""The runs of a command: which runs a table, a figure or a --task/--mode command makes, running them (resume) and
handing their result files to report.py, which prints the table or draws the figure."""
from __future__ import annotations

from . import report
from .common import ReproduceError
from .paper import FIGURES, TABLES, TEXT_MODES, VISION_MODES
from .runs import Run, Workspace, execute_all, make_run


def table_columns(number: int, modes=None) -> list:
    """The columns of a table that a command runs: those of `modes` (default: all)."""
    return [c for c in TABLES[number].columns if not modes or c.mode in modes]


def table_runs(number: int, tasks, modes, seeds, dapt) -> dict:
    """(task, column label) -> the cell's runs, one per seed; tasks, modes: only these rows and columns."""
    return {(task, c.label): [make_run(task, c.mode, c.aux, s, dapt) for s in seeds]
            for task in TABLES[number].tasks if not tasks or task in tasks for c in table_columns(number, modes)}


def reads_dapt(table: int | None, modes, aux: str | None) -> bool:
    """Whether a run trains on DAPT text: of the table's columns of `modes` (all without), or without a table of
    --mode `modes` with --aux `aux`."""
    runs = [r for cell in table_runs(table, None, modes, [0], "10x").values() for r in cell] if table else \
        [make_run("", mode, aux, 0, "10x") for mode in modes]
    return any(corpus.startswith("dapt") for r in runs for corpus in r.aux)


def run_table(number: int, ws: Workspace, seeds=None, tasks=None, modes=None, dapt: str | None = None) -> str:
    """Runs what a table needs (resume), prints it and writes OUT/table<number>.md. tasks, modes: only these rows
    and columns; seeds: default the paper's number; dapt: the DAPT corpus (default the table's)."""
    table = TABLES[number]
    seeds = seeds or list(range(table.seeds))
    dapt = dapt or table.dapt
    if table.note:
        print(f"note: {table.note}")
    cells = table_runs(number, tasks, modes, seeds, dapt)
    if not cells:
        raise ReproduceError(f"Table {number} has no cell for --task {tasks} --mode {modes}")
    results = execute_all(ws, [r for runs in cells.values() for r in runs])
    return report.print_table(number, cells, results, seeds, ws.models.identity(), ws.settings.budget, dapt,
                              ws.settings.out)


def figure_runs(number: int, tasks, seeds) -> dict:
    """The cells of a figure, each (task, label[, DAPT corpus]) -> its runs; tasks: only these panels."""
    chosen = [t for t in FIGURES[number][1] if not tasks or t in tasks]
    if number == 2:
        return {(t, label, n): [make_run(t, mode, aux, s, n) for s in seeds] for t in chosen for n in ("1x", "10x")
                for label, mode, aux in (("DAPT", "dapt", None), ("META-TARTAN", "meta", "dapt"))}
    if number == 3:
        return {(t, label): [make_run(t, mode, "dapt", s, "10x") for s in seeds] for t in chosen
                for label, mode in (("separate head phi*", "meta"), ("same head phi'", "meta-samehead"))}
    return {(t, "META-TARTAN"): [make_run(t, "meta", "dapt+tapt", s, "10x") for s in seeds] for t in chosen}


def figure_modes(number: int) -> tuple[str, ...]:
    """The modes a figure's runs train."""
    return tuple(dict.fromkeys(r.mode for runs in figure_runs(number, None, [0]).values() for r in runs))


def run_figure(number: int, ws: Workspace, seeds=None, tasks=None) -> str:
    """Runs what a figure needs (resume) and draws it to OUT/figure<number>.png; tasks: only these panels."""
    seeds = seeds or list(range(FIGURES[number][2]))
    cells = figure_runs(number, tasks, seeds)
    results = execute_all(ws, [r for runs in cells.values() for r in runs])
    return report.draw_figure(number, cells, results, seeds, ws.settings.out)


def family_runs(tasks, modes, seeds, aux: str | None, dapt: str | None, aux_files: tuple[str, ...]) -> list[Run]:
    """--task ... --mode ...: every (task, mode, seed) combination; a mode the task has not, or --aux where it reads
    nothing, is an error."""
    runs = []
    for task in tasks:
        valid = VISION_MODES if task == "mammals" else TEXT_MODES
        for mode in modes:
            if mode not in valid:
                raise ReproduceError(f"--mode {mode} does not apply to {task} (choose from {', '.join(valid)})")
            if task == "mammals" and (aux or aux_files):
                raise ReproduceError("mammals has one auxiliary task (the other 95 CIFAR-100 classes): no --aux")
            if aux == "none" and not aux_files:
                raise ReproduceError("--aux none needs at least one --aux-file")
            files = () if mode == "finetune" else aux_files  # the other modes of the command use the --aux-file corpora
            runs += [make_run(task, mode, aux, s, dapt or "10x", files) for s in seeds]
    return runs


def run_family(ws: Workspace, tasks, modes, seeds=None, aux: str | None = None, dapt: str | None = None,
               aux_files: tuple[str, ...] = (), baseline: str | None = None) -> dict:
    """Runs family_runs (resume; seeds: default 0-9) and prints each cell's mean and std, and the table of each of
    the user's own tasks (Settings.own_tasks, also in `tasks`) with p-values against `baseline`."""
    seeds = seeds or list(range(10))
    runs = family_runs(tasks, modes, seeds, aux, dapt, aux_files)
    results = execute_all(ws, runs)
    if ws.settings.report_only and len(results) < len(runs):  # (none at all: execute_all refused)
        print(f"--report-only: {len(runs) - len(results)} of {len(runs)} run(s) have no result file in "
              f"{ws.settings.out} and are left out")
    report.print_family(ws.settings.out, ws.settings.own_tasks, ws.settings.metric, tasks, modes, runs, results,
                        baseline, seeds)
    return results
