"""The run folder: what a run writes, and how a run is checked, checkpointed and resumed.

``config.json``   the resolved config (written once every input has been checked)
``metrics.jsonl`` one record per finished epoch
``summary.json``  status, scores, counters, provenance (written when the run ends)
``student.pt``    the scored student's state dict
``samples.png``   the last 64 synthesized images
``checkpoint.pt`` while running: everything needed to resume (removed when the run ends)
``pool.pt``       synthesis-only runs: the pool, for ``--init-bank``

Every file is written to a temporary name and renamed over, so a crash never leaves a torn file.
"""

from __future__ import annotations

import io
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .errors import DfkdError
from .runtime import append_jsonl, atomic_torch_save, atomic_write_bytes, atomic_write_json

CONFIG, METRICS, SUMMARY, CHECKPOINT = "config.json", "metrics.jsonl", "summary.json", "checkpoint.pt"
STUDENT, SAMPLES, POOL = "student.pt", "samples.png", "pool.pt"

# Fields that may differ between the attempts of one run (where it runs, how fast it evaluates).
_IGNORED_FOR_RESUME = {"device", "eval_batch_size"}


@dataclass
class Counters:
    """Budget and timing counters, checkpointed with the run."""

    images: int = 0
    teacher_passes: int = 0
    synth_seconds: float = 0.0
    distill_seconds: float = 0.0
    eval_seconds: float = 0.0
    elapsed: float = 0.0  # wall seconds of the run, summed over resumed sessions
    rounds: int = 0
    kd_steps: int = 0
    best_acc: float = -1.0
    best_epoch: int = -1


def budget_reached(cfg: Any, counters: Counters, session_seconds: float) -> str | None:
    """The first budget of ``cfg`` that ``counters`` have reached, as ``name=limit``; None if none."""
    if cfg.max_images and counters.images >= cfg.max_images:
        return f"max_images={cfg.max_images}"
    if cfg.max_teacher_passes and counters.teacher_passes >= cfg.max_teacher_passes:
        return f"max_teacher_passes={cfg.max_teacher_passes}"
    if cfg.max_seconds and counters.elapsed + session_seconds >= cfg.max_seconds:
        return f"max_seconds={cfg.max_seconds:g}"
    return None


class RunFolder:
    """One run's folder on disk."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    # ------------------------------------------------------------ config

    def check_config(self, config: dict[str, Any]) -> None:
        """Refuse a folder that holds another run's config (before anything is written)."""
        cfg_path = self.path / CONFIG
        wanted = json.loads(json.dumps(config, default=str))  # tuples -> lists, as on disk
        if not cfg_path.is_file():
            return
        try:
            existing = json.loads(cfg_path.read_text())
        except json.JSONDecodeError:
            raise DfkdError(f"{cfg_path} is corrupt; choose another --output or delete that folder") from None
        if _comparable(existing) != _comparable(wanted):
            diff = sorted(k for k in set(existing) | set(wanted)
                          if k not in _IGNORED_FOR_RESUME and existing.get(k) != wanted.get(k))
            raise DfkdError(f"{self.path} holds a different run (differs in: {', '.join(diff)}); "
                            "choose another --output or --name")

    def write_config(self, config: dict[str, Any]) -> None:
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            atomic_write_json(self.path / CONFIG, config)
        except OSError as exc:
            raise DfkdError(f"cannot write to {self.path}: {exc.strerror or exc}") from None

    # ------------------------------------------------------------ progress

    def finished_summary(self) -> dict[str, Any] | None:
        """The summary of a run that already ended (complete or stopped by its budget), else None."""
        path = self.path / SUMMARY
        if not path.is_file():
            return None
        summary = json.loads(path.read_text())
        return summary if summary.get("status") in ("complete", "budget") else None

    def append_metrics(self, record: dict[str, Any]) -> None:
        append_jsonl(self.path / METRICS, record)

    def metrics(self) -> list[dict[str, Any]]:
        return read_metrics(self.path / METRICS)

    def truncate_metrics(self, epochs: int) -> None:
        """Drop records of epochs from ``epochs`` on (they will be run again)."""
        path = self.path / METRICS
        if not path.is_file():
            return
        kept = [r for r in read_metrics(path) if r.get("epoch", 0) < epochs]
        atomic_write_bytes(path, "".join(json.dumps(r) + "\n" for r in kept).encode())

    # ------------------------------------------------------------ checkpoint

    def save_checkpoint(self, state: dict[str, Any]) -> None:
        atomic_torch_save(self.path / CHECKPOINT, state)

    def load_checkpoint(self) -> dict[str, Any] | None:
        """The checkpoint's state, or None when the folder has none."""
        path = self.path / CHECKPOINT
        if not path.is_file():
            return None
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # a checkpoint is replaced atomically, so this is a foreign file
            raise DfkdError(f"cannot resume from {path}: {type(exc).__name__}; delete it to start over") from None

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
    """Per-epoch records; a last line cut short by a crash is skipped."""
    if not Path(path).is_file():
        return []
    out = []
    for line in Path(path).read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def save_sample_grid(images: torch.Tensor, path: Path, nrow: int = 8) -> None:
    """uint8 images -> one PNG grid."""
    from torchvision.utils import save_image

    buf = io.BytesIO()
    save_image(images.float() / 255.0, buf, nrow=nrow, padding=2, format="png")
    atomic_write_bytes(path, buf.getvalue())


def timestamp() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")
