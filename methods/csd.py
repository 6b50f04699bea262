"""CSD, customizing synthetic data (Luo, Chen, Wang, ICME 2023): synthesize samples that are
hard for the student's current ability, measured by a self-supervised augmented task.

Every image is rotated by 0/90/180/270 degrees and an auxiliary head on the student's pooled
features predicts the joint label ``4*y + r``. Synthesis (CMI's generator loop) maximizes that
head's cross entropy next to the usual BN-statistics and one-hot terms; after every student
step the head takes one SGD step on the same batch, and it is re-initialized after each round.
Every detail follows the authors' code (github.com/luoshiya/CSD); docs/methods/csd.md lists them.

The student's own loss is a separate, registered component, ``csd``: KL + CE on the pool's
labels + an aligned feature-map MSE. ``--loss kl`` runs CSD's synthesis with plain KD, and
``--method cmi --loss csd`` CMI's synthesis with CSD's loss.

Published runs start from an init bank: build it with ``--preset bank`` (synthesis only,
``csd = 0``), then pass ``--set init_bank=<that run folder>`` to the main run.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from dfkd_bench.errors import DfkdError
from dfkd_bench.generative import GeneratorConfig, GeneratorSynthesizer
from dfkd_bench.generator import dcgan_init_
from dfkd_bench.losses import kl_divergence
from dfkd_bench.method import DistillLoss, LossContext, Outputs, SynthBatch, SynthContext
from dfkd_bench.presets import CPU_PROTOCOL, QUICK_PROTOCOL
from dfkd_bench.registry import LOSSES, SYNTHESIZERS, register_preset
from dfkd_bench.settings import LossSettings
from dfkd_bench.zoo import feature_dims, stage_modules

ROTATIONS = 4


def rotate_with_labels(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The self-supervised augmented batch: ``x`` rotated by r * 90 degrees for r = 0..3,
    stacked rotation-major ``(4B, C, H, W)``, with joint labels ``4*y + r``."""
    if x.shape[-1] != x.shape[-2]:
        raise ValueError(f"rotation labels need square images, got {x.shape[-2]}x{x.shape[-1]}")
    x4 = torch.cat([torch.rot90(x, r, dims=(2, 3)) for r in range(ROTATIONS)])
    y4 = torch.cat([ROTATIONS * y + r for r in range(ROTATIONS)])
    return x4, y4


class AuxHead(nn.Module):
    """2-layer MLP on the student's pooled features, L2-normalized output of width 4*K (the authors' MLPHead).

    Its logits enter the cross entropy as they are, without a temperature, as in the authors' code."""

    def __init__(self, in_features: int, num_classes: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(in_features, in_features), nn.ReLU(inplace=True),
                                 nn.Linear(in_features, ROTATIONS * num_classes))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.net(features), dim=1)


@SYNTHESIZERS.register
class CSD(GeneratorSynthesizer):
    name = "csd"
    summary = "CMI's generator + BN + CE, maximizing a rotation-augmented auxiliary task's CE on the student"
    uses_labels = True
    default_loss = "csd"

    @dataclass
    class Config(GeneratorConfig):
        g_steps: int = 200
        lr_g: float = 1e-3
        lr_z: float = 1e-3
        bn: float = 1.0
        oh: float = 1.0
        adv: float = 0.0
        csd: float = 10.0  # weight of minus the auxiliary cross entropy
        # The head's SGD: the authors give it the run's initial lr (--lr, 0.1), momentum 0.9 and weight decay
        # 1e-4, one optimizer for the whole run (its momentum survives the head's re-initializations).
        head_lr: float = 0.0  # 0: the run's initial student lr
        head_momentum: float = 0.9
        head_weight_decay: float = 1e-4

    def __init__(self, ctx: SynthContext, cfg: Config):
        super().__init__(ctx, cfg)
        c, h, _ = ctx.image_shape
        _, width = feature_dims(ctx.student, c, h)
        # PyTorch's default initialization first; N(0, 0.02) after every round (``after_round``)
        self.aux_head = AuxHead(width, ctx.num_classes).to(ctx.device)
        self.head_optimizer = torch.optim.SGD(self.aux_head.parameters(), lr=cfg.head_lr or ctx.lr,
                                              momentum=cfg.head_momentum, weight_decay=cfg.head_weight_decay)

    def student_features(self, x: torch.Tensor) -> torch.Tensor:
        """The student's globally pooled penultimate features of normalized images, float32."""
        student = self.ctx.student
        with self.ctx.autocast():
            pooled = student.forward_head(student.forward_features(x), pre_logits=True)
        return pooled.float()

    def aux_cross_entropy(self, features: torch.Tensor, y4: torch.Tensor) -> torch.Tensor:
        """The auxiliary head's CE on pooled student features of a rotated batch (joint labels ``y4``)."""
        return F.cross_entropy(self.aux_head(features), y4)

    # ---------------------------------------------------------------- synthesis

    def synthesize(self) -> SynthBatch:
        # Gradients reach G and z only: the head is frozen here (the runner freezes the student),
        # so no stale gradient leaks into the head's next SGD step.
        self.aux_head.requires_grad_(False)
        try:
            return super().synthesize()
        finally:
            self.aux_head.requires_grad_(True)

    def on_epoch_start(self, epoch: int, warmup: bool) -> None:
        super().on_epoch_start(epoch, warmup)
        if self.cfg.csd > 0:  # the authors' loss has the csd term *instead of* the adversarial one (csd.py:139-147)
            self.adversarial = False

    def extra_terms(self, images: torch.Tensor, x: torch.Tensor, y: torch.Tensor,
                    t_logits: torch.Tensor, s_logits: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.cfg.csd <= 0:
            return {}
        x4, y4 = rotate_with_labels(x, y)
        return {"csd": -self.cfg.csd * self.aux_cross_entropy(self.student_features(x4), y4)}

    def after_round(self, batch: SynthBatch) -> None:
        # The head measures the student as it learns from this round's batches, so it starts over
        # (the authors' reset_head after every synthesis, with their reset_model initialization).
        dcgan_init_(self.aux_head)

    # ---------------------------------------------------------------- student steps

    def after_student_step(self, x: torch.Tensor, y: torch.Tensor | None) -> dict[str, float]:
        if self.cfg.csd <= 0:  # the head is only read by the csd term
            return {}
        if y is None:
            raise DfkdError("csd trains its auxiliary head on the pool's labels, but the pool has none "
                            "(an init bank from a method that keeps no labels?); build the bank with csd")
        x4, y4 = rotate_with_labels(x, y)
        student = self.ctx.student
        was_training = student.training
        # Eval mode, as during synthesis, and so the rotated batch leaves the student's BN
        # running statistics alone.
        student.eval()
        try:
            with torch.no_grad():
                features = self.student_features(x4)
        finally:
            student.train(was_training)
        loss = self.aux_cross_entropy(features, y4)
        self.head_optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.head_optimizer.step()
        return {"aux_ce": loss.item()}

    # ---------------------------------------------------------------- checkpoint

    def get_extra_state(self) -> Any:
        return {**super().get_extra_state(), "head_optimizer": self.head_optimizer.state_dict()}

    def set_extra_state(self, state: Any) -> None:
        super().set_extra_state(state)
        self.head_optimizer.load_state_dict(state["head_optimizer"])


def align_head(in_channels: int, out_channels: int, size: tuple[int, int]) -> nn.Sequential:
    """Maps a student feature map onto a teacher's (the authors' AlignHead): adaptive pool to ``size``,
    1x1 conv, BN, ReLU, 3x3 conv, BN, ReLU, 1x1 conv, all convolutions without bias, a mid width of
    twice the teacher's channels."""
    mid = 2 * out_channels
    return nn.Sequential(
        nn.AdaptiveAvgPool2d(size),
        nn.Conv2d(in_channels, mid, 1, bias=False), nn.BatchNorm2d(mid), nn.ReLU(inplace=True),
        nn.Conv2d(mid, mid, 3, padding=1, bias=False), nn.BatchNorm2d(mid), nn.ReLU(inplace=True),
        nn.Conv2d(mid, out_channels, 1, bias=False),
    )


class LastStageMaps:
    """Keeps the output of a model's last stage (``zoo.stage_modules``) from its latest forward pass:
    the map CSD aligns. For the zoo's WRNs that is the last block group's output *before* the final
    BN-ReLU, which is what the authors' ``return_features`` gives (their ``fea[-2]``)."""

    def __init__(self, model: nn.Module):
        self.map: torch.Tensor | None = None
        stage_modules(model)[-1].register_forward_hook(self._keep)

    def _keep(self, module: nn.Module, inputs: Any, output: torch.Tensor) -> None:
        self.map = output

    def shape(self, model: nn.Module, in_chans: int, image_size: int) -> tuple[int, int, int]:
        """The map's (C, H, W) for images of this size (one forward in eval mode)."""
        p = next(model.parameters())
        was_training = model.training
        model.eval()
        with torch.no_grad():
            model(torch.zeros(2, in_chans, image_size, image_size, device=p.device, dtype=p.dtype))
        model.train(was_training)
        shape, self.map = tuple(self.map.shape[1:]), None
        return shape


@LOSSES.register
class CSDLoss(DistillLoss):
    name = "csd"
    summary = "KL * T^2 + CE on the pool's labels + fea * MSE(align(student's last stage), teacher's last stage)"
    needs_labels = True

    @dataclass
    class Config(LossSettings):
        ce: float = 1.0  # weight of the CE on the synthesized images' target labels
        fea: float = 30.0  # weight of the feature-map MSE

    def __init__(self, ctx: LossContext, cfg: Config):
        super().__init__(ctx, cfg)
        c, h, _ = ctx.image_shape
        self._teacher_maps, self._student_maps = LastStageMaps(ctx.teacher), LastStageMaps(ctx.student)
        t_channels, t_h, t_w = self._teacher_maps.shape(ctx.teacher, c, h)
        s_channels, _, _ = self._student_maps.shape(ctx.student, c, h)
        self.align = align_head(s_channels, t_channels, (t_h, t_w))

    def forward(self, s: Outputs, t: Outputs, y: torch.Tensor | None) -> dict[str, torch.Tensor]:
        if y is None:
            raise DfkdError("the csd loss needs the pool's labels, but the sampled batch has none "
                            "(an init bank from a method that keeps no labels?)")
        terms = {"kd": kl_divergence(s.logits, t.logits, self.ctx.temperature)}
        if self.cfg.ce > 0:
            terms["ce"] = self.cfg.ce * F.cross_entropy(s.logits.float(), y)
        if self.cfg.fea > 0:
            # the runner has just run both networks on this batch: their last-stage maps are fresh
            s_map, t_map = self._student_maps.map, self._teacher_maps.map
            terms["fea"] = self.cfg.fea * F.mse_loss(self.align(s_map).float(), t_map.float())
        return terms


# Published: CIFAR, WRN-40-2 -> WRN-16-1, starting from an init bank (the "bank" preset).
# With --loss kl the loss.fea key does not apply: the run says so in a note and goes on (CSD synthesis + plain KD).
register_preset("csd", "paper", {
    "epochs": 100, "ep_steps": 2000, "kd_steps": 2000, "batch_size": 128, "synth_batch_size": 200,
    "lr": 0.1, "momentum": 0.9, "weight_decay": 1e-4, "temperature": 20.0,
    "method.g_steps": 200, "method.csd": 10.0, "loss.fea": 30.0,
})
register_preset("csd", "quick", {**QUICK_PROTOCOL, "method.g_steps": 20})
register_preset("csd", "cpu", {**CPU_PROTOCOL, "method.g_steps": 30})
# The init bank: 400 rounds x 200 images, g_steps 500, csd = 0, no KD (one epoch of 400 rounds).
register_preset("csd", "bank", {
    "synthesis_only": True, "epochs": 1, "ep_steps": 400, "kd_steps": 1, "synth_batch_size": 200,
    "method.g_steps": 500, "method.csd": 0.0,
})
