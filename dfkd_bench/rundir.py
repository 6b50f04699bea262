"""The run folder: what a run writes, and how a run is checked, checkpointed and resumed.

``config.json``   the resolved config (written once every input has been checked)
``metrics.jsonl`` one record per finished epoch
``summary.json``  status, scores, counters, provenance (written when the run ends)
``student.pt``    the scored student's state dict
``samples.png``   the last 64 synthesized images
``checkpoint.pt`` while running: everything needed to resume (removed when the run ends)
``pool.pt``       synthesis-only runs: the pool, for ``--init-bank``
``.lock``         the lock of the one process that runs in the folder (released when it exits)

Every file is written to a temporary name and renamed over, so a crash never leaves a torn file;
temporaries left by a killed process are removed when the run starts again.
"""

from __future__ import annotations

import io
import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

from .errors import DfkdError
from .runtime import (
    TMP_GLOB,
    append_jsonl,
    atomic_torch_save,
    atomic_write_bytes,
    atomic_write_json,
    peak_memory,
    read_json_object,
    safe_load,
)

try:  # POSIX; elsewhere a run folder is not locked
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None

CONFIG, METRICS, SUMMARY, CHECKPOINT = "config.json", "metrics.jsonl", "summary.json", "checkpoint.pt"
STUDENT, SAMPLES, POOL, LOCK = "student.pt", "samples.png", "pool.pt", ".lock"

# Fields that may differ between the attempts of one run (where it runs, how fast it evaluates).
_IGNORED_FOR_RESUME = {"device", "eval_batch_size", "teacher_pretrained", "teacher_weights"}  # the sha256 decides

# The run fields that choose autocast. A run where autocast was not in effect computed in float32 whatever they say
# (before amp was off by default, every CPU run's config said amp=true, amp_dtype=float16).
AMP_FIELDS = ("amp", "amp_dtype", "amp_cpu")


def autocast_in_effect(config: dict[str, Any], device_type: str) -> bool:
    """Whether a run with ``config`` (a run's config dict) runs under autocast on a ``device_type`` device
    (``"cuda"`` or ``"cpu"``): ``amp`` set, and the device CUDA or ``amp_cpu`` set too (engine.Runner)."""
    return bool(config.get("amp")) and (device_type == "cuda" or bool(config.get("amp_cpu")))


def without_idle_amp(config: dict[str, Any], in_effect: bool) -> dict[str, Any]:
    """``config`` without :data:`AMP_FIELDS` when autocast was not in effect (they changed no number)."""
    return config if in_effect else {k: v for k, v in config.items() if k not in AMP_FIELDS}


# Record fields that depend on the machine and its load, not on the arithmetic of the run.
MEMORY_FIELDS = ("peak_rss_mb", "peak_cuda_mb")
MACHINE_FIELDS = ("synth_seconds", "distill_seconds", "elapsed_seconds", *MEMORY_FIELDS)
LAST_K = 3  # epochs whose accuracy compare's stability column averages (the stability literature's "last epochs")


@dataclass
class Counters:
    """Budget and timing counters, checkpointed with the run (:meth:`state_dict`)."""

    images: int = 0
    teacher_passes: int = 0
    synth_seconds: float = 0.0
    distill_seconds: float = 0.0
    eval_seconds: float = 0.0
    elapsed: float = 0.0  # wall seconds of the run, summed over resumed sessions (see session_elapsed)
    rounds: int = 0
    kd_steps: int = 0
    best_acc: float = -1.0
    best_epoch: int = -1
    # not state: the open timers (innermost last, with the time each last started) and this session's start
    _timers: list[list[Any]] = field(default_factory=list, repr=False, compare=False)
    _session_start: float | None = field(default=None, repr=False, compare=False)

    @contextmanager
    def timing(self, name: str) -> Iterator[None]:
        """Add the block's wall seconds to the counter ``name``. A timed block inside another pauses the
        outer one, so a second is counted once: a fresh batch made inside a student step is synthesis."""
        now = time.time()
        if self._timers:
            outer = self._timers[-1]
            setattr(self, outer[0], getattr(self, outer[0]) + now - outer[1])
        self._timers.append([name, now])
        try:
            yield
        finally:
            end = time.time()
            _, started = self._timers.pop()
            setattr(self, name, getattr(self, name) + end - started)
            if self._timers:
                self._timers[-1][1] = end

    def progress(self, device: Any) -> dict[str, Any]:
        """The counts, seconds and peak memory (:func:`~dfkd_bench.runtime.peak_memory` on ``device``) an
        epoch's record in ``metrics.jsonl`` carries."""
        return {"images": self.images, "teacher_passes": self.teacher_passes, "kd_steps": self.kd_steps,
                "synth_seconds": round(self.synth_seconds, 3), "distill_seconds": round(self.distill_seconds, 3),
                "elapsed_seconds": round(self.session_elapsed(), 3), **peak_memory(device)}

    def start_session(self) -> None:
        """This process starts (or resumes) the run now."""
        self._session_start = time.time()

    def session_elapsed(self) -> float:
        """The run's wall seconds so far: earlier sessions and this one."""
        return self.elapsed + (time.time() - self._session_start if self._session_start is not None else 0.0)

    def end_session(self) -> None:
        self.elapsed, self._session_start = self.session_elapsed(), None

    def state_dict(self) -> dict[str, Any]:
        """The counters, with this session's time so far in ``elapsed`` (what a resumed run continues from)."""
        state = {f.name: getattr(self, f.name) for f in fields(self) if not f.name.startswith("_")}
        state["elapsed"] = self.session_elapsed()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for name, value in state.items():
            if name.startswith("_") or not hasattr(self, name):
                raise KeyError(f"unknown counter '{name}'")
            setattr(self, name, value)


def budget_reached(cfg: Any, counters: Counters) -> str | None:
    """The first budget of ``cfg`` that ``counters`` have reached, as ``name=limit``; None if none."""
    if cfg.max_images and counters.images >= cfg.max_images:
        return f"max_images={cfg.max_images}"
    if cfg.max_teacher_passes and counters.teacher_passes >= cfg.max_teacher_passes:
        return f"max_teacher_passes={cfg.max_teacher_passes}"
    if cfg.max_seconds and counters.session_elapsed() >= cfg.max_seconds:
        return f"max_seconds={cfg.max_seconds:g}"
    return None


def run_summary(cfg: Any, status: str, reason: str | None, metrics: list[dict[str, Any]], counters: Counters,
                teacher: dict[str, Any], student_arch: str | None, ranks: dict[str, Any], device: str,
                amp_dtype: str | None, normalization: dict[str, list[float]] | None = None) -> dict[str, Any]:
    """``summary.json``: status, what the run was made of (config names, the teacher's sha256), the
    score (the last epoch's accuracy) beside the best epoch, the counters, and provenance."""
    from .runtime import git_commit, versions

    c = counters
    return {
        "status": status, "reason": reason,
        "method": cfg.method, "loss": cfg.loss, "preset": cfg.preset,
        "dataset": cfg.dataset, "teacher": cfg.teacher, "student": cfg.student,
        "teacher_arch": teacher.get("arch"), "student_arch": student_arch, "seed": cfg.seed,
        "epochs_done": len(metrics), "final_acc": metrics[-1]["test_acc"] if metrics else None,
        "best_acc": round(c.best_acc, 4) if c.best_acc >= 0 else None,
        "best_epoch": c.best_epoch if c.best_epoch >= 0 else None,
        "teacher_acc": teacher.get("test_accuracy"), "teacher_sha256": teacher.get("sha256"),
        "teacher_path": teacher.get("path"), "teacher_variant": teacher.get("variant"), "normalization": normalization,
        "images": c.images, "teacher_passes": c.teacher_passes, "kd_steps": c.kd_steps,
        "synth_seconds": round(c.synth_seconds, 2), "distill_seconds": round(c.distill_seconds, 2),
        "eval_seconds": round(c.eval_seconds, 2), "total_seconds": round(c.elapsed, 2),
        # the largest of the epochs' peaks (every session's, for a resumed run), in MiB; None: not measured
        **{key: max((r[key] for r in metrics if r.get(key) is not None), default=None) for key in MEMORY_FIELDS},
        **ranks, "device": device, "amp": amp_dtype is not None, "amp_dtype": amp_dtype,
        "versions": versions(), "git_commit": git_commit(), "finished": timestamp(),
    }


class RunFolder:
    """One run's folder on disk."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._lock: Any = None

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    # ------------------------------------------------------------ config

    def check_config(self, config: dict[str, Any], defaults: dict[str, Any] | None = None,
                     device_type: str | None = None) -> None:
        """Refuse a folder that holds another run's config (before anything is written). A field the
        folder's config lacks (written before the field existed) counts as its value in ``defaults``.
        On a ``device_type`` (default: the one ``config["device"]`` picks here) where a config's autocast
        would not be in effect, its AMP fields are not compared: both compute in float32."""
        cfg_path = self.path / CONFIG
        wanted = json.loads(json.dumps(config, default=str))  # tuples -> lists, as on disk
        if not cfg_path.is_file():
            return
        existing = read_json_object(cfg_path, "a run's config; choose another --output or delete that folder")
        existing = {**json.loads(json.dumps(defaults or {}, default=str)), **existing}
        if device_type is None:
            name = str(wanted.get("device", "auto"))
            device_type = "cuda" if name.startswith("cuda") or (name == "auto" and torch.cuda.is_available()) \
                else "cpu"
        existing = without_idle_amp(existing, autocast_in_effect(existing, device_type))
        wanted = without_idle_amp(wanted, autocast_in_effect(wanted, device_type))
        if _comparable(existing) != _comparable(wanted):
            diff = sorted(k for k in set(existing) | set(wanted)
                          if k not in _IGNORED_FOR_RESUME and existing.get(k) != wanted.get(k))
            raise DfkdError(f"{self.path} holds a different run (differs in: {', '.join(diff)}); "
                            "choose another --output or --name")

    def write_config(self, config: dict[str, Any]) -> bool:
        """Write ``config.json`` into a folder that has none; returns whether it wrote. A folder's config stays
        what its first session wrote (:meth:`check_config` found a later session to be the same run). The
        check happens here, inside the call, so that under data parallelism only rank 0 looks at the disk
        and every rank makes the same call (a rank that looked after rank 0 wrote would skip it and hang).
        Raises :class:`DfkdError` when the folder cannot be written."""
        if (self.path / CONFIG).is_file():
            return False
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            atomic_write_json(self.path / CONFIG, config)
            return True
        except OSError as exc:
            raise DfkdError(f"cannot write to {self.path}: {exc.strerror or exc}") from None

    # ------------------------------------------------------------ one writer

    def lock(self) -> None:
        """Take the folder for this process: an exclusive ``flock`` on ``.lock``, held until :meth:`unlock`
        or the process's end (the kernel releases it on any exit, SIGKILL included). Then remove what a
        killed writer left: temporaries, and the checkpoint of a run whose summary was written.
        Raises :class:`DfkdError` when another process holds the folder."""
        if self._lock is not None or fcntl is None:
            return
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            handle = open(self.path / LOCK, "a")
        except OSError as exc:
            raise DfkdError(f"cannot write to {self.path}: {exc.strerror or exc}") from None
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.close()
            raise DfkdError(f"{self.path} is in use by another dfkd-bench process (one run, one writer); "
                            "wait for it to end, or choose another --output or --name") from None
        self._lock = handle
        try:
            for leftover in self.path.glob(TMP_GLOB):
                leftover.unlink(missing_ok=True)
            if self.finished_summary() is not None:
                (self.path / CHECKPOINT).unlink(missing_ok=True)
        except BaseException:  # a corrupt summary: the caller gets the error, the folder is free again
            self.unlock()
            raise

    def unlock(self) -> None:
        if self._lock is not None:
            self._lock.close()  # closing the descriptor releases the flock
            self._lock = None

    # ------------------------------------------------------------ progress

    def finished_summary(self) -> dict[str, Any] | None:
        """The summary of a run that already ended (complete or stopped by its budget), else None.
        Raises :class:`DfkdError` when ``summary.json`` is not a JSON object."""
        path = self.path / SUMMARY
        if not path.is_file():
            return None
        try:
            summary = json.loads(path.read_text())
        except (UnicodeDecodeError, json.JSONDecodeError):
            summary = None
        if not isinstance(summary, dict):
            raise DfkdError(f"{path} is corrupt (not a JSON object); delete it to run again, or choose another "
                            "--output or --name")
        return summary if summary.get("status") in ("complete", "budget") else None

    def append_metrics(self, record: dict[str, Any]) -> None:
        append_jsonl(self.path / METRICS, record)

    def metrics(self) -> list[dict[str, Any]]:
        return read_metrics(self.path / METRICS)

    def check_metrics(self, epochs_done: int) -> None:
        """Refuse to resume after ``epochs_done`` epochs unless ``metrics.jsonl`` holds epochs 0 .. epochs_done - 1,
        in order, each once, and then at most later epochs in order (a kill between an epoch's record and
        its checkpoint leaves one; the resume drops them and runs those epochs again)."""
        epochs = [r["epoch"] for r in self.metrics()]
        increasing = all(a < b for a, b in zip(epochs, epochs[1:]))
        if epochs[:epochs_done] != list(range(epochs_done)) or not increasing:
            shown = ", ".join(map(str, epochs[:12])) + (", ..." if len(epochs) > 12 else "")
            raise DfkdError(f"cannot resume {self.path}: its checkpoint is after epoch {epochs_done - 1}, but "
                            f"{METRICS} holds epochs [{shown}] (0-based), not 0..{epochs_done - 1} each once; the "
                            "folder was changed since, so delete it (or its checkpoint.pt) to start over")

    def truncate_metrics(self, epochs: int) -> None:
        """Drop records of epochs from ``epochs`` on (they will be run again)."""
        path = self.path / METRICS
        if not path.is_file():
            return
        kept = [r for r in read_metrics(path) if r["epoch"] < epochs]
        atomic_write_bytes(path, "".join(json.dumps(r) + "\n" for r in kept).encode())

    # ------------------------------------------------------------ checkpoint

    def save_checkpoint(self, state: dict[str, Any]) -> None:
        atomic_torch_save(self.path / CHECKPOINT, state)

    def load_checkpoint(self, teacher: dict[str, Any] | None = None) -> dict[str, Any] | None:
        """The checkpoint's state, or None when the folder has none.

        Raises:
            DfkdError: the file is not a dfkd-bench checkpoint, or it was made with another teacher than
                ``teacher`` (a sidecar: its ``sha256`` and ``path``).
        """
        path = self.path / CHECKPOINT
        if not path.is_file():
            return None
        # a checkpoint is replaced atomically, so one that does not load is a foreign file
        state = safe_load(path, "checkpoint (delete it to start the run over)")
        if not isinstance(state, dict) or not isinstance(state.get("epoch"), int):
            raise DfkdError(f"cannot resume from {path}: not a dfkd-bench checkpoint; delete it to start over")
        theirs, ours = state.get("teacher_sha256"), (teacher or {}).get("sha256")
        if theirs and ours and theirs != ours:
            raise DfkdError(f"cannot resume {self.path}: its checkpoint was made with teacher sha256 {theirs[:12]}, "
                            f"but the teacher found now is {ours[:12]} ({teacher.get('path')}); restore "
                            "that teacher, or start the run over in another folder")
        return state

    # ------------------------------------------------------------ the end

    def write_outputs(self, summary: dict[str, Any], student: dict[str, torch.Tensor] | None,
                      samples: torch.Tensor | None, pool: dict[str, Any] | None) -> None:
        """Write the end-of-run files, the summary last, then drop the checkpoint."""
        if student is not None:
            atomic_torch_save(self.path / STUDENT, student)
        if samples is not None and len(samples):
            save_sample_grid(samples, self.path / SAMPLES)
        if pool is not None:
            atomic_torch_save(self.path / POOL, pool)
        atomic_write_json(self.path / SUMMARY, summary)
        (self.path / CHECKPOINT).unlink(missing_ok=True)


def _comparable(cfg: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in cfg.items() if k not in _IGNORED_FOR_RESUME}


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """Per-epoch records, each a JSON object with an integer ``epoch``; a last line cut short by a
    crash is skipped. Raises :class:`DfkdError` naming the file and line for anything else (a file that
    is not UTF-8 text, a line that is not a record)."""
    path = Path(path)
    if not path.is_file():
        return []
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise DfkdError(f"{path} is unreadable ({type(exc).__name__}); it is not a metrics file") from None
    out = []
    for number, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if number == len(lines):  # the append that a crash cut short
                continue
            raise DfkdError(f"{path}, line {number}: not JSON; it is not a metrics file") from None
        if not isinstance(record, dict) or not isinstance(record.get("epoch"), int):
            raise DfkdError(f"{path}, line {number}: not an epoch record (a JSON object with an integer 'epoch')")
        out.append(record)
    return out


def save_sample_grid(images: torch.Tensor, path: Path, nrow: int = 8) -> None:
    """uint8 images -> one PNG grid."""
    from torchvision.utils import save_image

    buf = io.BytesIO()
    save_image(images.float() / 255.0, buf, nrow=nrow, padding=2, format="png")
    atomic_write_bytes(path, buf.getvalue())


def timestamp() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")
