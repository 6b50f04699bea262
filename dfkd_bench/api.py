"""One run as a library call: plan it, make sure its teacher exists, execute it.

    from dfkd_bench.api import plan_run, ensure_teacher, execute

    plan = plan_run("csd", "quick", {"epochs": "2"}, dataset="fashion-mnist", teacher="wrn16_2", seed=0)
    ensure_teacher(plan.cfg, store=None, train=True)     # trains it with the dataset's recipe if missing
    summary = execute(plan)                              # writes plan.run_dir; returns summary.json's dict

``dfkd-bench run``, ``sweep`` (local and on Ray) and every rank of ``run --ddp`` go through these
three functions; the command line only parses options and draws progress. A :class:`Plan` is
frozen and picklable (plain data: the run config holds the method's and loss's settings as dicts),
so a Ray task receives the plan itself, not the options it was made from.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import RunConfig, resolve_config
from .registry import LOSSES, SYNTHESIZERS

DEFAULT_OUTPUT = Path("results/runs")


@dataclass(frozen=True)
class Plan:
    """Everything one run is made of, resolved and checked; nothing loaded yet.

    Attributes:
        cfg: the resolved run config (``cfg.method_cfg`` and ``cfg.loss_cfg`` hold the method's and
            loss's settings as dicts); it is what ``config.json`` records.
        run_dir: the run folder the run writes (or resumes).
        student_given: whether the user chose the student (else the teacher's paired student or the default).
        notes: one line per preset setting that does not apply (a preset's ``loss.*`` key under another loss).
    """

    cfg: RunConfig
    run_dir: Path
    student_given: bool = False
    notes: tuple[str, ...] = ()

    def method_config(self) -> Any:
        """The method's ``Config`` instance (checked again as it is built)."""
        return SYNTHESIZERS.get(self.cfg.method).Config(**self.cfg.method_cfg)

    def loss_config(self) -> Any:
        """The loss's ``Config`` instance."""
        return LOSSES.get(self.cfg.loss).Config(**self.cfg.loss_cfg)

    @property
    def student_reason(self) -> str:
        """Why the run uses this student: the user's choice, the teacher's paper pair, or the fallback."""
        from .zoo import paper_student

        cfg = self.cfg
        if self.student_given:
            return "as given"
        if paper_student(cfg.teacher) == cfg.student:
            return f"the paired student for a {cfg.teacher} teacher; --student picks another"
        return f"no pair lists a {cfg.teacher} teacher, so the default; --student picks another"


def plan_run(method: str, preset: str = "quick", overrides: dict[str, Any] | None = None, *,
             loss: str | None = None, output: Path | str = DEFAULT_OUTPUT, name: str | None = None,
             resume_dir: Path | str | None = None, **fields: Any) -> Plan:
    """Resolve one run: defaults <- the method's ``preset`` <- ``fields`` (dataset, teacher, student, seed,
    epochs, device, init_bank; ``None`` means unset) <- ``overrides`` (``--set`` keys, budgets) <- ``loss``.

    The run folder is ``resume_dir`` if given, else ``output / name`` (``name`` defaults to
    :func:`default_run_name`).

    Raises:
        DfkdError: any unknown name or refused value, before anything is loaded or written.
    """
    overrides = dict(overrides or {})
    if loss is not None:
        overrides["loss"] = loss
    notes: list[str] = []
    cfg, _, _ = resolve_config(method, preset, overrides, notes=notes, **fields)
    run_dir = Path(resume_dir) if resume_dir is not None else Path(output) / (name or default_run_name(cfg))
    given = fields.get("student") is not None or "student" in overrides
    return Plan(cfg, run_dir, given, tuple(notes))


def default_run_name(cfg: RunConfig) -> str:
    """``<dataset>-<teacher>-<student>-<method>[-<loss>]-<preset>-s<seed>``; the loss only when not the method's."""
    loss = "" if cfg.loss == SYNTHESIZERS.get(cfg.method).default_loss else f"-{cfg.loss}"
    return f"{cfg.dataset}-{cfg.teacher}-{cfg.student}-{cfg.method}{loss}-{cfg.preset}-s{cfg.seed}"


def teacher_headline(spec: Any, arch: str, store: Path | None = None) -> str:
    """The line that opens a teacher training; with ``store``, it says the run found no teacher there."""
    from .teachers import stored_name

    name = stored_name(arch, spec.image_size)
    what = f"training {name} on the {spec.name} training set"
    if store is not None:
        what = f"no {name} teacher for {spec.name} in {store}, {what} (--no-train-teacher refuses instead)"
    return what


ProgressFactory = Callable[[str, Any], Any]  # (headline, training recipe) -> teachers.TrainProgress or None


def ensure_teacher(cfg: RunConfig, store: Path | None, train: bool,
                   progress: ProgressFactory | None = None) -> None:
    """Make sure the teacher of ``cfg`` exists: when the store has none, store timm's pretrained weights
    (``teacher_pretrained``) or train it with its dataset's recipe (as ``dfkd-bench teacher train``; never for
    a class-folder dataset such as ImageNet), reporting to ``progress(headline, recipe)`` if given.

    Raises:
        DfkdError: the teacher is missing and ``train`` is False, or this is one rank of a data-parallel
            run (ranks would each train it: the launcher trains it first); the message names the command.
    """
    from .data import get_dataset
    from .distributed import launched_world_size
    from .teachers import (
        default_store,
        default_train_config,
        find_teacher,
        import_pretrained,
        load_teacher,
        train_teacher,
        variant_seed,
    )

    if cfg.teacher_checkpoint:
        return
    spec = get_dataset(cfg.dataset)
    store = Path(store) if store else default_store()
    if find_teacher(spec, cfg.teacher, store) is not None:
        return
    if cfg.teacher_pretrained and launched_world_size() <= 1:
        import_pretrained(spec, cfg.teacher, store, cfg.teacher_weights, cfg.device)
        return
    seed = variant_seed(cfg.teacher)  # wrn16_2@s3: the recipe with seed 3; a named variant is imported, not trained
    if not train or launched_world_size() > 1 or seed is None or spec.lazy or cfg.teacher_pretrained:
        load_teacher(spec, cfg.teacher, store)  # raises the one-line error naming the command
    recipe = default_train_config(cfg.dataset, seed=seed)
    reporter = progress(teacher_headline(spec, cfg.teacher, store), recipe) if progress else None
    train_teacher(spec, cfg.teacher, recipe, store, device=cfg.device, progress=reporter)


def execute(plan: Plan, store: Path | None = None, reporter: Any = None) -> dict[str, Any]:
    """Build the runner for ``plan`` and run it to its end (or resume it). Returns the summary
    (``summary.json``'s content). The teacher must exist (:func:`ensure_teacher`).

    Raises:
        DfkdError: a problem with the inputs (teacher, data, run folder), in one line.
    """
    from .engine import Runner

    runner = Runner(plan.cfg, plan.method_config(), plan.loss_config(), plan.run_dir, store, reporter)
    cfg, meta = plan.cfg, runner.teacher_meta
    acc = meta.get("test_accuracy")
    runner.reporter.message(f"{cfg.method}: teacher {cfg.teacher} -> {meta['arch']} "
                            f"({'-' if acc is None else f'{acc:.2f}'}% on {cfg.dataset}), "
                            f"student {cfg.student} -> {runner.student.dfkd_name} ({plan.student_reason}), "
                            f"device {runner.device}, run folder {plan.run_dir}")
    return runner.run()


__all__ = ["Plan", "default_run_name", "ensure_teacher", "execute", "plan_run", "teacher_headline"]
