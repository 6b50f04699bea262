"""Base classes for synthesizers and distillation losses, and what the runner hands them.

A synthesizer sees the teacher, the student, the image shape, the normalization and the
number of classes: never a dataset. Adding a method is one file in ``methods/``::

    @SYNTHESIZERS.register
    class MyMethod(Synthesizer):
        name = "mine"
        summary = "one line for `dfkd-bench methods`"

        @dataclass
        class Config(MethodSettings):  # checks itself when built (dfkd_bench.settings)
            g_steps: int = at_least(1, default=100)

        def synthesize(self) -> SynthBatch: ...

    register_preset("mine", "paper", {...})
    register_preset("mine", "quick", {...})
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F

from .data import Normalizer
from .losses import kl_divergence
from .registry import LOSSES
from .settings import LossSettings


@dataclass
class SynthContext:
    """Everything a synthesizer may use. The teacher is frozen and in eval mode."""

    teacher: nn.Module
    student: nn.Module
    image_shape: tuple[int, int, int]  # (C, H, W)
    num_classes: int
    normalizer: Normalizer  # [0, 1] pixels -> network input
    device: torch.device
    synth_batch_size: int
    amp: bool = False  # autocast on (the runner enables it on CUDA, and on CPU with amp_cpu)
    class_names: tuple[str, ...] = ()  # the classes' names in label order (empty when the dataset has none)
    lr: float = 0.1  # the run's initial student learning rate
    warmup_epochs: int = 0  # the run's warm-up epochs (synthesis only)
    student_lr: float = 0.0  # the student's current learning rate, updated by the runner every epoch
    amp_dtype: torch.dtype = torch.float16
    epochs: int = 1  # the run's epochs, for schedules that span the run (AdaDFKD's curriculum)
    temperature: float = 1.0  # the run's distillation temperature (AdaDFKD's synthesis shares it, as its --T)

    def autocast(self) -> torch.autocast:
        """The run's autocast context for teacher/student passes during synthesis (off unless ``amp``)."""
        return torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp)


@dataclass
class SynthBatch:
    """One round's output: images in [0, 1], optional target labels, and how the loss went."""

    images: torch.Tensor
    labels: torch.Tensor | None = None
    losses: dict[str, float] = field(default_factory=dict)  # the last step's named terms
    loss_curve: list[float] = field(default_factory=list)  # total synthesis loss per step
    teacher_passes: int = 0  # teacher forward+backward passes spent on this batch (images x steps)
    # a "fresh" method handing the student images it handed out before (ZSKT's pseudo batch, reused for
    # its student steps): they count once, as a pool method's images count once however often they are drawn
    reused: bool = False


class Synthesizer(nn.Module):
    """A data-free method's synthesis half. Persistent state (generator, heads, banks) lives in
    submodules and buffers so ``state_dict`` checkpoints it; anything else goes through
    ``get_extra_state``/``set_extra_state``."""

    name: ClassVar[str]
    summary: ClassVar[str]
    Config: ClassVar[type]
    default_loss: ClassVar[str] = "kl"
    uses_labels: ClassVar[bool] = False  # the pool keeps the target labels
    # Where the student's batches come from: "pool" (every image synthesized so far, the CMI/Fast/CSD
    # protocol) or "fresh" (``sample`` makes a new batch for every student step, as the online
    # adversarial methods do; nothing is pooled).
    batch_source: ClassVar[str] = "pool"
    # Baselines only (reference rows, not data-free methods):
    is_baseline: ClassVar[bool] = False
    real_data_split: ClassVar[str | None] = None  # the runner fills the pool with this real split
    student_is_teacher: ClassVar[bool] = False  # evaluate the teacher itself, train nothing

    @classmethod
    def side_information(cls, cfg: Any) -> str:
        """What the method uses besides the teacher (and the student it trains), under the settings ``cfg``
        (its Config, or that Config's dict as config.json holds it): ``none``, or what, in a few words.
        A fair table says so beside the score."""
        return "none"

    def __init__(self, ctx: SynthContext, cfg: Any):
        super().__init__()
        self.ctx = ctx
        self.cfg = cfg

    def synthesize(self) -> SynthBatch:
        raise NotImplementedError

    def sample(self, n: int) -> SynthBatch:
        """A fresh batch of ``n`` images for one student step ("fresh" methods only); called under no_grad."""
        raise NotImplementedError(f"{type(self).__name__} declares batch_source='fresh' but has no sample()")

    def on_epoch_start(self, epoch: int, warmup: bool) -> None:
        """Called before each epoch's first round; ``warmup`` epochs only synthesize."""

    def after_round(self, batch: SynthBatch) -> None:
        """Called by the method's own ``synthesize`` once a round's batch is made, before it is returned
        (it may amend the batch: count extra teacher passes, say). Default: nothing."""

    def after_student_step(self, x: torch.Tensor, y: torch.Tensor | None) -> dict[str, float]:
        """Called after every student step on the (augmented, normalized) batch; returns logged terms."""
        return {}

    def teacher_student(self, x_norm: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Teacher and student logits on normalized images; gradients flow to ``x_norm`` only."""
        with self.ctx.autocast():
            t = self.ctx.teacher(x_norm)
            s = self.ctx.student(x_norm)
        return t.float(), s.float()


@dataclass
class Outputs:
    """A network's output on a batch: the last feature map and the logits."""

    features: torch.Tensor
    logits: torch.Tensor


@dataclass
class LossContext:
    teacher: nn.Module
    student: nn.Module
    image_shape: tuple[int, int, int]
    num_classes: int
    temperature: float


class DistillLoss(nn.Module):
    """The student's loss. Its parameters (if any) are trained with the student's optimizer."""

    name: ClassVar[str]
    summary: ClassVar[str]
    Config: ClassVar[type]
    needs_labels: ClassVar[bool] = False

    def __init__(self, ctx: LossContext, cfg: Any):
        super().__init__()
        self.ctx = ctx
        self.cfg = cfg

    def forward(self, s: Outputs, t: Outputs, y: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """Named terms; the runner minimizes their sum."""
        raise NotImplementedError

    @classmethod
    def compilable(cls, cfg: Any) -> bool:
        """Whether the loss with settings ``cfg`` works on compiled backbones (``--set compile=true``); asked
        before the loss is built, as building may already run the backbones. A loss that differentiates
        with respect to a backbone's intermediate feature maps does not: under ``torch.compile`` the maps its
        hooks catch are side outputs of one graph, not ancestors of the logits."""
        return True


@LOSSES.register
class CELoss(DistillLoss):
    name = "ce"
    summary = "cross entropy on the pool's labels only (no teacher): training from labels"
    needs_labels = True

    @dataclass
    class Config(LossSettings):
        pass

    def forward(self, s: Outputs, t: Outputs, y: torch.Tensor | None) -> dict[str, torch.Tensor]:
        return {"ce": F.cross_entropy(s.logits.float(), y)}


@LOSSES.register
class KLLoss(DistillLoss):
    name = "kl"
    summary = "KL(softmax(t/T) || softmax(s/T)) * T^2, the batch mean"

    @dataclass
    class Config(LossSettings):
        pass

    def forward(self, s: Outputs, t: Outputs, y: torch.Tensor | None) -> dict[str, torch.Tensor]:
        return {"kd": kl_divergence(s.logits, t.logits, self.ctx.temperature)}
