"""Where a sweep's runs execute. The local backend is the sequential loop in ``dfkd-bench sweep``;
this module is the Ray backend, imported only for ``--backend ray`` (Ray is the extra ``dfkd-bench[ray]``).

Each run is one Ray task with the requested CPUs and GPUs. It writes its run folder itself, so the
nodes must share the output folder (and see the same teacher store and datasets), as clusters on
SLURM or Kubernetes with a shared filesystem do. A finished run is skipped before anything is
submitted; an interrupted one resumes from its checkpoint inside its task, as in the local sweep.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable

from .api import Plan
from .errors import DfkdError
from .rundir import RunFolder


def import_ray() -> Any:
    """The ``ray`` module, or the one-line error that names the extra to install."""
    try:
        import ray
    except ImportError:
        raise DfkdError("--backend ray needs Ray: pip install 'dfkd-bench[ray]'") from None
    return ray


def run_on_ray(plans: list[Plan], teacher_store: Path, plugins: tuple[str, ...], address: str | None,
               cpus_per_run: int, gpus_per_run: float, echo: Callable[[str], None]) -> int:
    """Run ``plans`` as Ray tasks, print one line per finished run, and return how many failed.
    The teachers must exist (:func:`dfkd_bench.api.ensure_teacher`); paths must be absolute."""
    from .config import RunConfig

    todo, total, finished = [], len(plans), 0
    for plan in plans:
        folder = RunFolder(plan.run_dir)
        folder.check_config(plan.cfg.to_dict(), defaults=RunConfig().to_dict())
        done = folder.finished_summary()
        if done is None:
            todo.append(plan)
        else:
            finished += 1
            echo(f"[{finished}/{total}] {plan.run_dir.name}: already complete ({_acc(done)})")
    if not todo:
        return 0
    ray = import_ray()
    started = _connect(ray, address)
    try:
        task = ray.remote(_run_task).options(num_cpus=cpus_per_run, num_gpus=gpus_per_run)
        pending = {task.remote(plan, teacher_store, plugins, cpus_per_run): plan for plan in todo}
        failed = 0
        while pending:
            (ref,), _ = ray.wait(list(pending), num_returns=1)
            plan = pending.pop(ref)
            finished += 1
            try:
                outcome = ray.get(ref)
            except ray.exceptions.RayError as exc:  # the task crashed (not a failed run: that has a summary)
                failed += 1
                echo(f"[{finished}/{total}] {plan.run_dir.name}: crashed ({_last_line(exc)})")
                continue
            if "error" in outcome:  # a user error, as the local sweep: stop the grid
                for other in pending:
                    ray.cancel(other)
                raise DfkdError(f"{plan.run_dir.name}: {outcome['error']}")
            summary = outcome["summary"]
            failed += summary["status"] == "failed"
            detail = summary["reason"] if summary["status"] == "failed" else f"{summary['total_seconds']:.0f} s"
            echo(f"[{finished}/{total}] {plan.run_dir.name}: {_acc(summary)} ({summary['status']}, {detail})")
        return failed
    finally:
        if started:
            ray.shutdown()


def _connect(ray: Any, address: str | None) -> bool:
    """Connect to the cluster at ``address`` (None: start a local instance). Returns whether this started Ray."""
    if ray.is_initialized():
        return False
    options: dict[str, Any] = {"address": address, "logging_level": logging.WARNING}
    if address is None:
        options["include_dashboard"] = False
    try:
        ray.init(**options)
    except Exception as exc:  # Ray raises many kinds (ConnectionError, RuntimeError, ValueError, ...)
        raise DfkdError(f"cannot start or reach Ray ({address or 'a local instance'}): {_last_line(exc)}") from None
    return True


def _run_task(plan: Plan, teacher_store: Path, plugins: tuple[str, ...], threads: int) -> dict[str, Any]:
    """One run in a Ray worker: the same call as a local run, silent; a user error comes back as text."""
    import torch

    from .api import execute
    from .registry import load_plugins

    torch.set_num_threads(max(1, int(threads)))
    try:
        load_plugins(plugins)
        summary = execute(plan, teacher_store)
    except DfkdError as exc:
        return {"error": str(exc)}
    return {"summary": summary}


def _acc(summary: dict[str, Any]) -> str:
    return "no score" if summary.get("final_acc") is None else f"{summary['final_acc']:.2f}%"


def _last_line(exc: BaseException) -> str:
    lines = [line for line in str(exc).strip().splitlines() if line.strip()]
    return lines[-1] if lines else type(exc).__name__
