"""The data-free checkpoint rule: pick the epoch by the student's agreement with the teacher on held-out
synthetic images, never by the test set.

With ``--set selection_images=N`` a run makes N images with its own method once, after the first epoch in
which the student was trained, and keeps them out of the pool (the student never trains on them). After that
epoch and every later one, ``metrics.jsonl`` records ``selection_agreement``: the percentage of those images on
which the student's top-1 class equals the teacher's. ``compare`` then reports, per run, the test accuracy of
the epoch with the highest agreement (the latest such epoch on a tie), read after the fact from the per-epoch
evaluations: the choice itself never sees a test label.

Making the images must not change the run: the method's state (its ``state_dict``, which is what a resume
restores) and every RNG are saved before and restored after, so a run with the rule on trains the same student,
bit for bit, as the run with it off (tests/test_selection.py checks every method). The teacher passes spent on
the held-out images are recorded apart (``summary.json``, ``selection.teacher_passes``), not in the run's budget.

The rule follows the stability line of work's call for a label-free checkpoint choice (PRE-DFKD, CuDFKD,
TA-DFKD report last-epoch statistics instead); the agreement criterion is this project's, stated in full here.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from .data import Normalizer, sealed
from .errors import DfkdError
from .runtime import atomic_torch_save, rng_state, safe_load, set_rng_state

SELECTION = "selection.pt"  # the held-out images in the run folder, written once, read on resume


class HeldOutBatch:
    """``n`` synthetic images ``(n, C, H, W)`` in [0, 1], made by the run's method and never trained on."""

    def __init__(self, n: int, path: Path):
        self.n, self.path = n, Path(path)
        self.images: torch.Tensor | None = None
        self.teacher_top1: torch.Tensor | None = None
        self.made_after_epoch: int | None = None
        self.teacher_passes = 0

    @property
    def ready(self) -> bool:
        return self.images is not None

    def discard(self) -> None:
        """A fresh start: an earlier attempt's images go with its metrics."""
        self.path.unlink(missing_ok=True)

    def load(self, resumed_after: int) -> None:
        """Read the images back when resuming after epoch ``resumed_after`` (if they were made by then).

        Raises:
            DfkdError: the run made them before that epoch but the file is missing or damaged.
        """
        if not self.path.is_file():
            return
        state = safe_load(self.path, "the run's held-out selection images; delete the run folder to start over")
        try:
            images, epoch, passes = state["images"], int(state["made_after_epoch"]), int(state["teacher_passes"])
        except (KeyError, TypeError, ValueError):
            raise DfkdError(f"{self.path} is not this project's selection file; delete the run folder to start "
                            "over") from None
        if epoch <= resumed_after:
            self.images, self.made_after_epoch, self.teacher_passes = images, epoch, passes

    def make(self, method: Any, student: nn.Module, ranks: Any, epoch: int, fresh: bool) -> None:
        """Make the images with ``method``: synthesis rounds until ``n`` are made, or for a method whose
        student steps draw fresh images from its generator (``fresh``), one new draw of ``n`` (never the images a
        student step is about to use). Then put the method's and the student's state (a DAFL round updates the
        student's BatchNorm statistics) and every RNG back as they were, and store the images in the run folder."""
        saved = copy.deepcopy({"method": method.state_dict(), "student": student.state_dict(), "rng": rng_state()})
        was_training = student.training
        student.eval().requires_grad_(False)
        parts, made = [], 0
        try:
            with sealed():
                if fresh:
                    with torch.no_grad():
                        drawn = method.draw(self.n) if hasattr(method, "draw") else method.sample(self.n).images
                    parts.append(drawn.detach().float().cpu())
                    made = len(drawn)
                while made < self.n:
                    batch = ranks.gather(method.synthesize())
                    if not len(batch.images):
                        raise DfkdError(f"{type(method).__name__} made no images in a round: selection_images "
                                        "needs a method that synthesizes its own")
                    parts.append(batch.images.detach().float().cpu())
                    made += len(batch.images)
                    self.teacher_passes += batch.teacher_passes
        finally:
            method.load_state_dict(saved["method"])
            student.load_state_dict(saved["student"])
            set_rng_state(saved["rng"])
            student.train(was_training).requires_grad_(True)
        self.images, self.made_after_epoch = torch.cat(parts)[:self.n].contiguous(), epoch
        if not torch.isfinite(self.images).all():
            raise DfkdError("the method produced non-finite held-out images")
        if ranks.main:
            atomic_torch_save(self.path, {"images": self.images, "made_after_epoch": epoch,
                                          "teacher_passes": self.teacher_passes})

    @torch.no_grad()
    def agreement(self, teacher: nn.Module, student: nn.Module, normalizer: Normalizer, device: torch.device,
                  batch_size: int) -> float:
        """Percentage (0-100) of the held-out images on which the student's top-1 class is the teacher's."""
        if self.teacher_top1 is None:
            self.teacher_top1 = self._top1(teacher, normalizer, device, batch_size)
        return 100.0 * (self._top1(student, normalizer, device, batch_size) == self.teacher_top1).float().mean().item()

    def _top1(self, model: nn.Module, normalizer: Normalizer, device: torch.device, batch_size: int) -> torch.Tensor:
        was_training = model.training
        model.eval()
        out = [model(normalizer(self.images[i:i + batch_size].to(device))).argmax(1).cpu()
               for i in range(0, len(self.images), batch_size)]
        model.train(was_training)
        return torch.cat(out)

    def summary(self) -> dict[str, Any]:
        return {"images": self.n, "made_after_epoch": self.made_after_epoch, "teacher_passes": self.teacher_passes,
                "rule": "the epoch with the highest selection_agreement (the latest on a tie)"}
