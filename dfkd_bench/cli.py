"""The ``dfkd-bench`` command line."""

from __future__ import annotations

import contextlib
import json
import signal
import sys
from pathlib import Path

import click
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from .config import RunConfig
from .errors import DataAccessError, DfkdError
from .rundir import LAST_K

# Tables are wide; outside a terminal (logs, CI) rich would wrap them at 80 columns.
_WIDTH = None if sys.stdout.isatty() else 200
console = Console(width=_WIDTH)
err_console = Console(stderr=True, width=_WIDTH)


def _progress() -> Progress:
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TextColumn("ETA"),
                    TimeRemainingColumn(), console=console, transient=False)


@contextlib.contextmanager
def _user_errors():
    """Turns the user's errors into one line and exit code 2, never a traceback."""
    try:
        yield
    except DfkdError as exc:  # the message is text, never rich markup ("dfkd-bench[ray]")
        err_console.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
        sys.exit(exc.exit_code)
    except DataAccessError as exc:
        err_console.print(f"[bold red]method error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
        sys.exit(1)
    except KeyboardInterrupt:
        err_console.print("interrupted; results written so far are kept")
        sys.exit(130)


class _Group(click.Group):
    def invoke(self, ctx: click.Context):
        with _user_errors():
            return super().invoke(ctx)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--plugin", "plugins", multiple=True, metavar="MODULE",
              help="Import MODULE first so the methods/losses it registers are available (repeatable).")
@click.version_option(package_name="dfkd-bench")
def cli(plugins: tuple[str, ...]) -> None:
    """Benchmark data-free knowledge distillation under one protocol."""
    from .registry import load_plugins

    load_plugins(plugins)


class _RichReporter:
    """Draws the runner's progress: epoch, round, loss terms, accuracy, ETA."""

    def __init__(self, progress: Progress):
        self.progress = progress
        self.task = None
        self.acc = "-"

    def start(self, total_rounds: int, done_rounds: int, description: str) -> None:
        self.task = self.progress.add_task(description, total=total_rounds, completed=done_rounds, info="")

    def round_done(self, epoch: int, round_: int, terms: dict[str, float]) -> None:
        shown = " ".join(f"{k.split('/')[-1]}={v:.3g}" for k, v in terms.items()
                         if k.startswith(("kd/", "synth/total")))
        self.progress.update(self.task, advance=1, info=f"ep {epoch + 1} r {round_ + 1} {shown} acc {self.acc}")

    def epoch_done(self, record: dict) -> None:
        self.acc = f"{record['test_acc']:.2f}"
        warm = " (warm-up)" if record.get("warmup") else ""
        self.progress.console.print(f"epoch {record['epoch'] + 1}{warm}: test acc {record['test_acc']:.2f}%, "
                                    f"{record['images']} images, synthesis {record['synth_seconds']:.0f}s, "
                                    f"distillation {record['distill_seconds']:.0f}s")

    def message(self, text: str) -> None:
        self.progress.console.print(text, soft_wrap=True)


# ---------------------------------------------------------------- run

def _student_help() -> str:
    """--student's help, from the zoo's table of paper pairs."""
    from .zoo import DEFAULT_STUDENT, PAPER_STUDENTS

    pairs: dict[str, list[str]] = {}
    for teacher, student in PAPER_STUDENTS.items():
        pairs.setdefault(student, []).append(teacher)
    listed = "; ".join(f"{', '.join(teachers)} -> {student}" for student, teachers in pairs.items())
    return f"Zoo or timm model name. Default: the teacher's paired student ({listed}), else {DEFAULT_STUDENT}."


def _recipe_help(field: str) -> str:
    """A `teacher train` option's help: each dataset recipe's value of ``field``."""
    from .teachers import TRAIN_DEFAULTS, default_train_config

    values = ", ".join(f"{name} {getattr(default_train_config(name), field)}" for name in TRAIN_DEFAULTS)
    return f"Default: the dataset's recipe ({values})."


STUDENT_HELP = _student_help()
DEFAULTS = RunConfig()  # the run options' defaults are the run config's

@cli.command()
@click.option("--method", required=True, help="A registered method (see `dfkd-bench methods`).")
@click.option("--dataset", default=None, help=f"Default: the preset's, else {DEFAULTS.dataset}.")
@click.option("--teacher", default=None,
              help=f"Zoo or timm model name. Default: the preset's, else {DEFAULTS.teacher}.")
@click.option("--student", default=None, help=STUDENT_HELP)
@click.option("--preset", default="quick", show_default=True, help="A preset of the method: paper, quick, cpu, ...")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--loss", default=None, help="Distillation loss (default: the method's paper default).")
@click.option("--epochs", default=None, type=int, help="Shortcut for --set epochs=N.")
@click.option("--set", "assignments", multiple=True, metavar="KEY=VALUE",
              help="Override any config field (run field, method.X or loss.X); repeatable.")
@click.option("--budget", "budgets", multiple=True, metavar="KIND=N",
              help="Stop at the first budget reached: images=N, teacher_passes=N, seconds=S or epochs=N "
                   "(repeatable; every count is recorded either way).")
@click.option("--output", type=click.Path(path_type=Path), default=Path("results/runs"), show_default=True,
              help="Parent folder of the run folder.")
@click.option("--name", default=None, help="Run folder name (default: derived from the config).")
@click.option("--resume", "resume_dir", type=click.Path(path_type=Path), default=None,
              help="Continue the run in this folder (re-running the same command does the same).")
@click.option("--init-bank", type=click.Path(path_type=Path), default=None,
              help="Start the pool from the pool of this (synthesis-only) run folder.")
@click.option("--teacher-store", type=click.Path(path_type=Path), default=None,
              help="Teacher store (default: $DFKD_BENCH_TEACHERS or ./teachers).")
@click.option("--device", default=None, help="auto (CUDA if present), cpu, cuda, cuda:1, ...")
@click.option("--ddp", default=None, type=click.IntRange(min=1), metavar="N",
              help="Data-parallel in N local processes (gloo on CPU, NCCL on CUDA), as "
                   "`torchrun --nproc_per_node=N -m dfkd_bench run ...` does.")
@click.option("--train-teacher/--no-train-teacher", default=True, show_default=True,
              help="Train a missing teacher with its dataset's recipe (as `teacher train`), or stop with exit 2.")
@click.option("--dry-run", is_flag=True,
              help="Print the resolved config (run fields, method's and loss's settings) as JSON and exit: "
                   "nothing is trained or written.")
def run(method, dataset, teacher, student, preset, seed, loss, epochs, assignments, budgets, output, name,
        resume_dir, init_bank, teacher_store, device, ddp, train_teacher, dry_run) -> None:
    """Run one method under the shared protocol and write a run folder."""
    from .api import ensure_teacher, execute, plan_run
    from .config import parse_assignments, parse_budgets

    if resume_dir is not None and not (Path(resume_dir) / "config.json").is_file():
        raise DfkdError(f"nothing to resume: {Path(resume_dir) / 'config.json'} does not exist")
    plan = plan_run(method, preset, {**parse_assignments(assignments), **parse_budgets(budgets)}, loss=loss,
                    output=output, name=name, resume_dir=resume_dir, dataset=dataset, teacher=teacher,
                    student=student, seed=seed, epochs=epochs, device=device,
                    init_bank=str(init_bank) if init_bank else None)
    if dry_run:
        _print_notes(plan.notes)
        click.echo(json.dumps({"run_dir": str(plan.run_dir), **plan.cfg.to_dict()}, indent=2, default=str))
        return
    if ddp:
        if train_teacher:  # once, here: the ranks only load it
            with _progress() as progress:
                ensure_teacher(plan.cfg, teacher_store, True, _teacher_progress(progress))
        return _spawn_ranks(ddp)
    _join_process_group(device)
    _print_notes(plan.notes)
    with _progress() as progress:
        ensure_teacher(plan.cfg, teacher_store, train_teacher, _teacher_progress(progress))
        summary = execute(plan, teacher_store, _RichReporter(progress))
    if summary["status"] == "failed":
        err_console.print(f"[bold red]run failed:[/] {summary['reason']} (see {plan.run_dir / 'summary.json'})")
        sys.exit(1)
    stop = f" (stopped by budget {summary['reason']})" if summary["status"] == "budget" else ""
    console.print(f"final (last-epoch) student accuracy {summary['final_acc']:.2f}%, teacher "
                  f"{summary['teacher_acc']:.2f}%, {summary['images']} images, {summary['total_seconds']:.0f}s{stop}")


def _print_notes(notes: tuple[str, ...]) -> None:
    for note in notes:
        err_console.print(f"[yellow]note:[/] {escape(note)}", highlight=False, soft_wrap=True)


def _join_process_group(device: str | None) -> None:
    """Under torchrun (or --ddp), join the run's process group for this command; only rank 0 prints."""
    from .distributed import is_main_process, process_group_from_env

    click.get_current_context().with_resource(process_group_from_env(device))
    if not is_main_process():
        console.quiet = err_console.quiet = True


def _spawn_ranks(nprocs: int) -> None:
    """``run --ddp N``: this command, without --ddp, in N processes forming one process group."""
    from .distributed import launched_world_size, spawn

    if launched_world_size() > 1:
        raise DfkdError("--ddp starts its own processes; under torchrun, leave it out")
    ctx = click.get_current_context()
    spawn(nprocs, _run_rank, ctx.find_root().params["plugins"], {**ctx.params, "ddp": None})


def _run_rank(plugins: tuple[str, ...], params: dict) -> None:
    """One process of ``run --ddp N`` (started by ``spawn``: a fresh interpreter)."""
    from .registry import load_plugins

    with _user_errors(), click.Context(cli) as ctx:
        load_plugins(plugins)
        ctx.invoke(run, **params)


# ---------------------------------------------------------------- methods

@cli.command()
def methods() -> None:
    """List the registered methods, their presets and default settings, and the distillation losses."""
    import dataclasses

    from .registry import LOSSES, SYNTHESIZERS, presets_for

    for title, baseline in (("methods", False), ("baselines (reference rows)", True)):
        table = Table(title=title)
        for col in ("name", "summary", "uses besides the teacher", "loss", "presets", "defaults"):
            table.add_column(col, overflow="fold")
        for name, cls in SYNTHESIZERS.items():
            if cls.is_baseline != baseline:
                continue
            defaults = ", ".join(f"{f.name}={f.default}" for f in dataclasses.fields(cls.Config)) or "-"
            table.add_row(name, cls.summary, cls.side_information(cls.Config()), cls.default_loss,
                          ", ".join(presets_for(name)), defaults)
        console.print(table)
    losses = Table(title="distillation losses")
    losses.add_column("loss")
    losses.add_column("summary", overflow="fold")
    for name, cls in LOSSES.items():
        losses.add_row(name, cls.summary)
    console.print(losses)


# ---------------------------------------------------------------- compare

# compare's terminal table: identity columns that move into the title when every row shares them, and
# secondary columns shown only with --wide (the md/csv/tex formats always carry everything)
TITLE_COLUMNS = ("dataset", "teacher", "teacher arch", "student", "loss", "preset", "settings", "side information",
                 "teacher acc", "teacher sha256")
WIDE_ONLY = ("best-epoch acc (test-selected)", "images", "synthesis s", "total s", "seeds per teacher")
SETTINGS_WIDTH = 32  # characters of a row's settings shown without --wide


def _cell(value, column: str, wide: bool) -> str:
    text = str(value)
    if column == "settings" and not wide and len(text) > SETTINGS_WIDTH:
        return text[:SETTINGS_WIDTH - 1] + "…"  # the full text: --wide, or the md/csv formats
    return text


def _print_warnings(caught: list) -> None:
    """Warnings about run folders, one line each; their text is shown as is, never read as rich markup."""
    for w in caught:
        err_console.print(f"[yellow]warning:[/] {escape(str(w.message))}", highlight=False)


@cli.command()
@click.argument("root", type=click.Path(path_type=Path), default=Path("results"))
@click.option("--format", "fmt", type=click.Choice(["table", "markdown", "csv", "latex"]), default="table",
              show_default=True)
@click.option("--output", type=click.Path(path_type=Path), default=None, help="Write the table to this file.")
@click.option("--at", "at", default=None, metavar="BUDGET=N",
              help="Compare at equal budget: accuracy after the last epoch within N of images, teacher_passes, "
                   "seconds, synth_seconds or epochs (e.g. --at images=5000).")
@click.option("--wide", is_flag=True,
              help="Every column in the terminal table (by default what all rows share moves into the title and "
                   "the secondary numbers are left out, so a typical table fits 100 columns).")
@click.option("--memory", is_flag=True,
              help="Show each run's peak memory in the terminal table (peak RSS; peak CUDA allocation on GPU "
                   "runs); the md/csv/tex formats always carry it.")
@click.option("--last-k", "last_k", type=click.IntRange(min=1), default=None,
              help=f"Show the stability column in the terminal table: each run's mean accuracy and its swing over "
                   f"its last K epochs, averaged over seeds (the md/csv/tex formats always carry it, K={LAST_K}).")
@click.option("--across", type=click.Choice(["teachers"]), default=None,
              help="teachers: one row per method and teacher architecture over its teachers (variants): the mean "
                   "of the per-teacher seed means, their spread, the worst teacher; ranked by a paired test over "
                   "teachers.")
def compare(root, fmt, output, at, wide, memory, last_k, across) -> None:
    """Compare every run folder below ROOT: last-epoch accuracy, mean ± std, 95% CI and n over seeds, and the
    methods not significantly worse than the best of their setting (Welch's t-test, p < 0.05)."""
    import warnings

    from .results import (
        BUDGET_COLUMNS,
        MEMORY_COLUMNS,
        across_teachers,
        collect,
        display_columns,
        failed_runs,
        note_for,
        summarize,
        to_format,
    )
    from .stats import ALPHA

    if not Path(root).exists():
        raise DfkdError(f"{root} does not exist")
    budget = None
    if at is not None:
        key, _, value = at.partition("=")
        if key not in BUDGET_COLUMNS:
            raise DfkdError(f"--at takes one of {', '.join(BUDGET_COLUMNS)}, got '{key}'")
        try:
            budget = (key, float(value))
        except ValueError:
            raise DfkdError(f"--at {at}: '{value}' is not a number") from None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        df = collect(root, at=budget, last_k=last_k or LAST_K)
        table = summarize(df) if across is None else across_teachers(df)
    _print_warnings(caught)
    if df.empty:
        raise DfkdError(f"no finished runs below {root}")
    failed = failed_runs(df)
    if fmt == "table":
        what = f"accuracy at {at}" if at else "last-epoch test accuracy"
        title = (f"runs below {root} (score: {what}, mean ± std over seeds, 95% t-CI; best group: Welch's t-test vs "
                 f"the best, p < {ALPHA} = worse)")
        if across:
            title = f"runs below {root} across teachers (score: {what}; paired t-test over teachers, p < {ALPHA})"
        cols = [c for c in display_columns(table) if (memory or c not in MEMORY_COLUMNS.values())
                and (last_k or not c.startswith("last-"))]
        if "teacher sha256" in cols and table["teacher sha256"].nunique() <= 1:  # one checkpoint: it tells nothing
            cols.remove("teacher sha256")
        if "side information" in cols and (table["side information"] == "none").all():  # the formats keep it
            cols.remove("side information")
        if not wide:  # what every row shares goes into the title; the secondary numbers wait for --wide
            shared = [c for c in cols if c in TITLE_COLUMNS and table[c].nunique(dropna=False) == 1]
            if shared:
                title += "\n" + ", ".join(f"{c} {table[c].iloc[0]}" for c in shared)
            cols = [c for c in cols if c not in shared and c not in WIDE_ONLY]
        out = Table(title=title, caption=note_for(table), caption_justify="left")
        for c in cols:
            out.add_column(c, overflow="fold")
        for _, row in table.iterrows():
            out.add_row(*(_cell(row[c], c, wide) for c in cols))
        console.print(out)
        text = to_format(table, "markdown") if output else None
    else:
        text = to_format(table, fmt)
        if not output:
            click.echo(text, nl=False)
    if not failed.empty:
        err_console.print(f"[yellow]{len(failed)} run(s) not averaged (failed, or no score):[/]")
        for _, r in failed.iterrows():
            err_console.print(escape(f"  {r['run']}: {r['status']} ({r['reason']})"), highlight=False)
    if output:
        from .runtime import atomic_write_bytes

        atomic_write_bytes(Path(output), text.encode())
        console.print(f"wrote {output}")


@cli.command()
@click.argument("root", type=click.Path(path_type=Path), default=Path("results"))
@click.option("--output", type=click.Path(path_type=Path), required=True, help="Folder for the report files.")
def report(root, output) -> None:
    """Write tables (md/csv/tex), accuracy curves, sample grids and an HTML page for the runs below ROOT."""
    import warnings

    from .report import write_report

    if not Path(root).exists():
        raise DfkdError(f"{root} does not exist")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            written = write_report(root, output)
        except OSError as exc:  # a plot or a sample grid that cannot be written
            raise DfkdError(f"cannot write the report to {output}: {exc.strerror or exc}") from None
    _print_warnings(caught)
    n = sum(len(v) for v in written.values())
    console.print(f"wrote {n} files and index.html to {output}")


def _csv_list(value: str, cast=str) -> list:
    items = [v.strip() for v in value.split(",") if v.strip()]
    try:
        return [cast(v) for v in items]
    except ValueError:
        raise DfkdError(f"cannot read '{value}' as a comma-separated list") from None


@cli.command()
@click.option("--methods", "method_list", required=True, help="Comma-separated methods/baselines.")
@click.option("--seeds", default="0", show_default=True, help="Comma-separated seeds.")
@click.option("--dataset", default=DEFAULTS.dataset, show_default=True)
@click.option("--teacher", "--teachers", "teachers", default=DEFAULTS.teacher, show_default=True,
              help="Comma-separated teachers (variants too: wrn16_2,wrn16_2@s1,wrn16_2@s2); every method and seed "
                   "runs with each.")
@click.option("--student", default=None, help=STUDENT_HELP)
@click.option("--preset", default="quick", show_default=True)
@click.option("--loss", default=None, help="Distillation loss for every method (default: each method's own).")
@click.option("--set", "assignments", multiple=True, metavar="KEY=VALUE")
@click.option("--budget", "budgets", multiple=True, metavar="KIND=N", help="As for `run`.")
@click.option("--output", type=click.Path(path_type=Path), default=Path("results/runs"), show_default=True)
@click.option("--teacher-store", type=click.Path(path_type=Path), default=None)
@click.option("--device", default=None)
@click.option("--backend", type=click.Choice(["local", "ray"]), default="local", show_default=True,
              help="local: one run after another in this process; ray: each run a Ray task (pip install "
                   "'dfkd-bench[ray]'; the nodes must share --output).")
@click.option("--address", default=None, help="Ray cluster: auto, or ray://host:port (default: a local instance).")
@click.option("--cpus-per-run", type=click.IntRange(min=1), default=None, help="Ray: CPUs per run [1].")
@click.option("--gpus-per-run", type=click.FloatRange(min=0), default=None, help="Ray: GPUs per run [0].")
@click.option("--train-teacher/--no-train-teacher", default=True, show_default=True, help="As for `run`.")
def sweep(method_list, seeds, dataset, teachers, student, preset, loss, assignments, budgets, output,
          teacher_store, device, backend, address, cpus_per_run, gpus_per_run, train_teacher) -> None:
    """Run a grid of methods x seeds (one after another, or on Ray), then print the compare table;
    finished runs are skipped, interrupted ones resume."""
    from .api import ensure_teacher, execute, plan_run
    from .config import parse_assignments, parse_budgets

    overrides = {**parse_assignments(assignments), **parse_budgets(budgets)}
    if backend == "local" and (address, cpus_per_run, gpus_per_run) != (None, None, None):
        raise DfkdError("--address, --cpus-per-run and --gpus-per-run need --backend ray")
    if backend == "ray":  # absolute paths: a worker's working directory is not this one
        from .backends import import_ray
        from .teachers import default_store

        import_ray()  # a missing extra is reported before anything else
        output, teacher_store = Path(output).resolve(), Path(teacher_store or default_store()).resolve()
    # every run is planned (and so checked) before anything runs
    plans = [plan_run(name, preset, overrides, loss=loss, output=output, dataset=dataset, teacher=teacher,
                      student=student, seed=seed, device=device)
             for teacher in _csv_list(teachers) for name in _csv_list(method_list) for seed in _csv_list(seeds, int)]
    _print_notes(tuple(dict.fromkeys(note for plan in plans for note in plan.notes)))
    with _progress() as progress:  # each teacher once, before any run starts (parallel tasks would each train it)
        for plan in {(p.cfg.dataset, p.cfg.teacher, p.cfg.teacher_checkpoint): p for p in plans}.values():
            ensure_teacher(plan.cfg, teacher_store, train_teacher, _teacher_progress(progress))
    if backend == "ray":
        from .backends import run_on_ray

        plugins = click.get_current_context().find_root().params["plugins"]
        failed = run_on_ray(plans, teacher_store, plugins, address, cpus_per_run or 1, gpus_per_run or 0.0,
                            console.print)
    else:
        failed = 0
        for plan in plans:
            with _progress() as progress:
                summary = execute(plan, teacher_store, _RichReporter(progress))
            if summary["status"] == "failed":
                failed += 1
                err_console.print(f"[bold red]failed:[/] {plan.run_dir}: {summary['reason']}")
            else:
                console.print(f"{plan.run_dir.name}: {summary['final_acc']:.2f}%")
    if failed < len(plans):
        click.get_current_context().invoke(compare, root=output)
    if failed:
        sys.exit(1)


# ---------------------------------------------------------------- teacher

@cli.group()
def dataset() -> None:
    """Datasets: the built-in ones and class folders you declare."""


@dataset.command("add")
@click.argument("name")
@click.option("--root", required=True, type=click.Path(path_type=Path),
              help="Folder holding TRAIN_DIR/<class>/<images> and TEST_DIR/<class>/<images>.")
@click.option("--image-size", required=True, type=int, help="Pixels of the square center crop the models see.")
@click.option("--mean", required=True, metavar="M1,M2,M3", help="Per-channel mean of [0, 1] pixels (1 or 3 values).")
@click.option("--std", required=True, metavar="S1,S2,S3", help="Per-channel std (as many values as --mean).")
@click.option("--resize", type=int, default=None, help="Resize the shorter side to this before the crop "
                                                       "(default: the image size).")
@click.option("--train-dir", default="train", show_default=True)
@click.option("--test-dir", default="val", show_default=True)
@click.option("--force", is_flag=True, help="Replace an existing declaration of NAME.")
def dataset_add(name, root, image_size, mean, std, resize, train_dir, test_dir, force) -> None:
    """Declare a class-folder dataset NAME; then --dataset NAME works in run, sweep and teacher train."""
    from .data import declare_dataset, declared_path

    record = declare_dataset(name, root, image_size, tuple(_csv_list(mean, float)), tuple(_csv_list(std, float)),
                             resize, train_dir, test_dir, force=force)
    console.print(f"declared {name}: {record['num_classes']} classes, {record['channels']} channel(s), "
                  f"{image_size} px, read lazily from {record['root']} ({declared_path(name)})", soft_wrap=True)


@dataset.command("list")
def dataset_list() -> None:
    """The datasets --dataset accepts: built in, and declared under <data root>/datasets/."""
    from .data import DECLARED, data_root, get_dataset
    from .registry import DATASETS

    table = Table(title="datasets")
    for col in ("name", "classes", "image", "normalization (mean / std)", "held", "source"):
        table.add_column(col)
    declared = sorted(p.stem for p in (data_root() / DECLARED).glob("*.json"))
    for name in [*DATASETS.names(), *declared]:
        try:
            spec = get_dataset(name)
        except DfkdError as exc:
            table.add_row(name, "-", "-", "-", "-", escape(str(exc)))
            continue
        norm = f"{_fmt_floats(spec.mean)} / {_fmt_floats(spec.std)}"
        table.add_row(name, str(spec.num_classes), f"{spec.channels}x{spec.image_size}x{spec.image_size}", norm,
                      "folders, lazily" if spec.lazy else "in memory", "declared" if name in declared else "built in")
    console.print(table)


def _fmt_floats(values) -> str:
    return ",".join(f"{v:g}" for v in values)


@cli.group()
def teacher() -> None:
    """Train, list and import teachers."""


@teacher.command("train")
@click.option("--dataset", default=DEFAULTS.dataset, show_default=True)
@click.option("--arch", required=True, help="Zoo or timm model name, e.g. wrn16_2, resnet34.")
@click.option("--epochs", default=None, type=click.IntRange(min=1),
              help=_recipe_help("epochs"))
@click.option("--batch-size", default=None, type=click.IntRange(min=1),
              help=_recipe_help("batch_size"))
@click.option("--lr", default=None, type=click.FloatRange(min=0, min_open=True),
              help=f"Peak (one-cycle) or initial (multistep) learning rate; {_recipe_help('lr')[0].lower()}"
                   f"{_recipe_help('lr')[1:]}")
@click.option("--seed", default=0, show_default=True, type=click.IntRange(min=0),
              help="Training seed; a seed N other than 0 stores the variant ARCH@sN beside the others.")
@click.option("--variant", default=None, help="Store as ARCH@VARIANT (default: sN for --seed N > 0, else none).")
@click.option("--limit", default=None, type=click.IntRange(min=0), help="Use only the first N training images.")
@click.option("--half", is_flag=True, default=None, help="Store float16 weights (half the file; loads as float32).")
@click.option("--store", type=click.Path(path_type=Path), default=None,
              help="Teacher store (default: $DFKD_BENCH_TEACHERS or ./teachers).")
@click.option("--device", default="auto", show_default=True)
@click.option("--force", is_flag=True, help="Replace a teacher already stored for (dataset, arch).")
def teacher_train(dataset, arch, epochs, batch_size, lr, seed, variant, limit, half, store, device, force) -> None:
    """Train a teacher on the real training set and store it with its sidecar.

    Every epoch but the last leaves a checkpoint; the same command resumes an interrupted training.
    """
    from .api import teacher_headline
    from .data import get_dataset
    from .teachers import default_store, default_train_config, split_teacher, train_teacher

    spec = get_dataset(dataset)
    store = store or default_store()
    if "@" not in arch and (variant or seed):
        arch = f"{arch}@{variant or f's{seed}'}"
    split_teacher(arch)  # a bad variant name: one line
    cfg = default_train_config(dataset, epochs=epochs, batch_size=batch_size, lr=lr, seed=seed, limit=limit,
                               half=half)
    with _progress() as progress:
        meta = train_teacher(spec, arch, cfg, store, device=device, force=force,
                             progress=_TeacherProgress(progress, teacher_headline(spec, arch), cfg))
    name = f"{meta['arch']}@{meta['variant']}" if meta.get("variant") else meta["arch"]
    console.print(f"stored {name} for {dataset}: test accuracy {meta['test_accuracy']:.2f}%, "
                  f"sha256 {meta['sha256'][:16]}..., in {store / dataset}")


class _TeacherProgress:
    """Progress bar, estimate line and per-epoch accuracy of a teacher training (``teachers.TrainProgress``)."""

    def __init__(self, progress: Progress, headline: str, cfg):
        self.progress, self.headline, self.cfg = progress, headline, cfg
        self.task, self.total = None, 0

    def start(self, start_epoch: int, done_steps: int, total_steps: int) -> None:
        self.total = total_steps
        self.task = self.progress.add_task("teacher", total=total_steps, completed=done_steps, info="")
        if start_epoch:
            self.progress.console.print(f"resuming the interrupted teacher training after epoch "
                                        f"{start_epoch}/{self.cfg.epochs}")

    def estimate(self, seconds: float, timed_steps: int) -> None:
        timed = _count(timed_steps, "timed step")
        self.progress.console.print(f"{self.headline}: {_count(self.cfg.epochs, 'epoch')}, "
                                    f"{_count(self.total, 'step')} of batch {self.cfg.batch_size}; about "
                                    f"{fmt_duration(seconds)} on this machine (from {timed})",
                                    highlight=False, soft_wrap=True)

    def step(self, done: int, total: int, epoch: int, loss: float) -> None:
        if done % 10 == 0 or done == total:
            self.progress.update(self.task, completed=done, info=f"epoch {epoch + 1}/{self.cfg.epochs} loss {loss:.3f}")

    def epoch(self, epoch: int, accuracy: float) -> None:
        self.progress.console.print(f"teacher epoch {epoch + 1}/{self.cfg.epochs}: test accuracy {accuracy:.2f}%")


def _teacher_progress(progress: Progress):
    """The factory :func:`dfkd_bench.api.ensure_teacher` takes: a progress bar for a teacher training."""
    return lambda headline, recipe: _TeacherProgress(progress, headline, recipe)


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


def fmt_duration(seconds: float) -> str:
    """A human reading of a duration: 40 s, 12 min, 2 h 05 min, 3.5 days."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    if seconds < 48 * 3600:
        hours, minutes = divmod(round(seconds / 60), 60)
        return f"{hours} h {minutes:02d} min"
    return f"{seconds / 86400:.1f} days"


@teacher.command("import")
@click.argument("checkpoint", type=click.Path(path_type=Path))
@click.option("--format", "fmt", default="cmi", show_default=True,
              help="cmi: the CMI/Fast/CSD code's {'state_dict': ...} layout; native: this zoo's keys.")
@click.option("--arch", required=True, help="Zoo or timm model name; ARCH@VARIANT stores a named variant beside "
                                           "the others (e.g. wrn40_2@released).")
@click.option("--dataset", required=True)
@click.option("--store", type=click.Path(path_type=Path), default=None)
@click.option("--device", default="auto", show_default=True)
@click.option("--force", is_flag=True, help="Replace a teacher already stored for (dataset, arch).")
@click.option("--mean", default=None, metavar="M1,M2,...",
              help="The per-channel mean the checkpoint was trained with (default: the dataset's; for CIFAR the "
                   "released teachers', CMI registry.py). Give --std with it.")
@click.option("--std", default=None, metavar="S1,S2,...", help="The per-channel std it was trained with.")
def teacher_import(checkpoint, fmt, arch, dataset, store, device, force, mean, std) -> None:
    """Convert a teacher checkpoint from another code base into the store, with the normalization it expects."""
    from .data import get_dataset
    from .teachers import PUBLISHED_TOLERANCE, default_store, import_teacher

    spec = get_dataset(dataset)
    store = store or default_store()
    mean, std = (_csv_list(v, float) if v is not None else None for v in (mean, std))
    meta = import_teacher(checkpoint, fmt, spec, arch, store, device, force=force, mean=mean, std=std)
    measured = meta["test_accuracy"]
    acc = f"{measured:.2f}%" if measured is not None else "not measured (no test data)"
    norm = meta["normalization"]
    console.print(f"imported {checkpoint} as {meta['arch']} for {dataset}: every tensor mapped, test accuracy {acc} "
                  f"(normalization mean {tuple(norm['mean'])}, std {tuple(norm['std'])})", soft_wrap=True)
    standard = meta.get("standard")
    if standard is None:
        return
    console.print(f"{standard['file']} is a released teacher ({standard['arch']}, {standard['dataset']}): "
                  f"{standard['published_accuracy']:.2f}% published ({standard['source']})", soft_wrap=True)
    mismatch = (standard["dataset"], standard["arch"]) != (spec.name, arch)
    if mismatch or (measured is not None and abs(measured - standard["published_accuracy"]) > PUBLISHED_TOLERANCE):
        what = (f"it was imported as {arch} for {spec.name}" if mismatch else
                f"measured {measured:.2f}% differs from the published {standard['published_accuracy']:.2f}% by more "
                f"than {PUBLISHED_TOLERANCE} points")
        err_console.print(f"[yellow]warning:[/] {escape(what)}: check the file, --arch/--dataset and the "
                          "normalization (--mean/--std)", highlight=False, soft_wrap=True)


@teacher.command("pretrained")
@click.argument("arch")
@click.option("--dataset", default="imagenet", show_default=True)
@click.option("--weights", default="", help="A local file of the weights (offline), read through timm's "
                                            "pretrained_cfg_overlay; default: timm fetches them (Hugging Face hub).")
@click.option("--store", type=click.Path(path_type=Path), default=None)
@click.option("--device", default="auto", show_default=True)
@click.option("--force", is_flag=True, help="Replace a teacher already stored for (dataset, arch).")
def teacher_pretrained(arch, dataset, weights, store, device, force) -> None:
    """Store timm's pretrained ARCH (timm:resnet50, timm:resnet50.tv_in1k, ...) as a teacher, measured on the test
    split under timm's normalization for those weights."""
    from .data import get_dataset
    from .teachers import default_store, import_pretrained

    spec = get_dataset(dataset)
    meta = import_pretrained(spec, arch, store or default_store(), weights, device, force=force)
    acc = meta["test_accuracy"]
    norm = meta["normalization"]
    console.print(f"stored timm's pretrained {meta['arch']} ({meta['pretrained']['tag'] or 'default tag'}) for "
                  f"{dataset}: test accuracy {'not measured (no test data)' if acc is None else f'{acc:.2f}%'} "
                  f"(normalization mean {tuple(norm['mean'])}, std {tuple(norm['std'])}), sha256 "
                  f"{meta['sha256'][:12]}", soft_wrap=True)


@teacher.command("list")
@click.option("--store", type=click.Path(path_type=Path), default=None)
def teacher_list(store) -> None:
    """List the stored teachers."""
    from .teachers import default_store, list_teachers

    store = store or default_store()
    rows = list_teachers(store)
    if not rows:
        console.print(f"no teachers in {store}")
        return
    table = Table(title=f"teachers in {store}")
    for col in ("dataset", "arch", "variant", "test acc", "epochs", "sha256", "path"):
        table.add_column(col)
    for m in rows:
        table.add_row(m.get("dataset", "?"), m.get("arch", "?"), m.get("variant") or "-",
                      _fmt_acc(m.get("test_accuracy")), str(m.get("train_settings", {}).get("epochs", "?")),
                      str(m.get("sha256", ""))[:12], m["path"])
    console.print(table)


def _fmt_acc(acc) -> str:
    return "-" if acc is None else f"{acc:.2f}"


def _terminate(signum, frame) -> None:
    raise KeyboardInterrupt  # SIGTERM ends a run as Ctrl-C does: the message, exit 130, results kept


def main() -> None:
    signal.signal(signal.SIGTERM, _terminate)
    cli(prog_name="dfkd-bench")


if __name__ == "__main__":
    main()
