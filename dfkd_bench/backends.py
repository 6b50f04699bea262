"""Where a sweep's runs execute. The local backend is the sequential loop in ``dfkd-bench sweep``;
this module is the Ray backend, imported only for ``--backend ray`` (Ray is the extra ``dfkd-bench[ray]``).

Each run is one Ray task with the requested CPUs and GPUs. It writes its run folder itself, so the
nodes must share the output folder (and see the same teacher store and datasets), as clusters on
SLURM or Kubernetes with a shared filesystem do. A finished run is skipped before anything is
submitted; an interrupted one resumes from its checkpoint inside its task, as in the local sweep.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from .errors import DfkdError
from .rundir import RunFolder


@dataclass
class RunRequest:
    """One run of the grid: what ``cli._execute`` takes."""

    method: str
    preset: str
    fields: dict[str, Any]
    overrides: dict[str, Any]
    loss: str | None
    output: Path
    teacher_store: Path | None
    run_dir: Path
    config: dict[str, Any]  # the resolved run config, to check the folder before submitting


def import_ray() -> Any:
    """The ``ray`` module, or the one-line error that names the extra to install."""
    try:
        import ray
    except ImportError:
        raise DfkdError("--backend ray needs Ray: pip install 'dfkd-bench[ray]'") from None
    return ray


def run_on_ray(requests: list[RunRequest], plugins: tuple[str, ...], address: str | None, cpus_per_run: int,
               gpus_per_run: float, echo: Callable[[str], None]) -> int:
    """Run ``requests`` as Ray tasks, print one line per finished run, and return how many failed."""
    from .config import RunConfig

    todo, total, finished = [], len(requests), 0
    for request in requests:
        folder = RunFolder(request.run_dir)
        folder.check_config(request.config, defaults=RunConfig().to_dict())
        done = folder.finished_summary()
        if done is None:
            todo.append(request)
        else:
            finished += 1
            echo(f"[{finished}/{total}] {request.run_dir.name}: already complete ({_acc(done)})")
    if not todo:
        return 0
    ray = import_ray()
    started = _connect(ray, address)
    try:
        task = ray.remote(_run_task).options(num_cpus=cpus_per_run, num_gpus=gpus_per_run)
        pending = {task.remote(r, plugins, cpus_per_run): r for r in todo}
        failed = 0
        while pending:
            (ref,), _ = ray.wait(list(pending), num_returns=1)
            request = pending.pop(ref)
            finished += 1
            try:
                outcome = ray.get(ref)
            except ray.exceptions.RayError as exc:  # the task crashed (not a failed run: that has a summary)
                failed += 1
                echo(f"[{finished}/{total}] {request.run_dir.name}: crashed ({_last_line(exc)})")
                continue
            if "error" in outcome:  # a user error, as the local sweep: stop the grid
                for other in pending:
                    ray.cancel(other)
                raise DfkdError(f"{request.run_dir.name}: {outcome['error']}")
            summary = outcome["summary"]
            failed += summary["status"] == "failed"
            detail = summary["reason"] if summary["status"] == "failed" else f"{summary['total_seconds']:.0f} s"
            echo(f"[{finished}/{total}] {request.run_dir.name}: {_acc(summary)} ({summary['status']}, {detail})")
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


def _run_task(request: RunRequest, plugins: tuple[str, ...], threads: int) -> dict[str, Any]:
    """One run in a Ray worker: the same code as a local run, silent; a user error comes back as text."""
    import torch

    from . import cli
    from .registry import load_plugins

    torch.set_num_threads(max(1, int(threads)))
    cli.console.quiet = cli.err_console.quiet = True
    try:
        load_plugins(plugins)
        summary, _ = cli._execute(request.method, request.preset, request.fields, request.overrides, request.loss,
                                  request.output, None, None, request.teacher_store, False)
    except DfkdError as exc:
        return {"error": str(exc)}
    return {"summary": summary}


def _acc(summary: dict[str, Any]) -> str:
    return "no score" if summary.get("final_acc") is None else f"{summary['final_acc']:.2f}%"


def _last_line(exc: BaseException) -> str:
    lines = [line for line in str(exc).strip().splitlines() if line.strip()]
    return lines[-1] if lines else type(exc).__name__
