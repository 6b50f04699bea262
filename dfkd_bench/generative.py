"""The generator-inversion loop that CMI, Fast and CSD share.

Each round: take a generator (fresh, or a clone of a shared one), draw latents ``z`` and
target classes ``y``, and optimize ``G`` and ``z`` jointly for ``g_steps`` with Adam on

    bn * L_BN + oh * CE(T(x), y) + adv * L_adv + <the method's extra terms>

where ``x`` is the per-sample augmented, normalized output of ``G(z)``. The lowest-loss
batch is returned. Methods customize it through small hooks instead of copying the loop.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from .augment import crop_flip
from .generator import Generator
from .inversion import invert
from .losses import BNStatistics, adversarial_loss
from .method import SynthBatch, SynthContext, Synthesizer
from .settings import MethodSettings, at_least


@dataclass
class GeneratorConfig(MethodSettings):
    """Settings every generator-based method has; a method's Config subclasses this."""

    g_steps: int = at_least(1, default=500)
    lr_g: float = 1e-3
    lr_z: float = 1e-3
    beta1: float = 0.5
    beta2: float = 0.999
    nz: int = at_least(1, default=256)
    ngf: int = at_least(1, default=64)
    bn: float = 1.0
    oh: float = 1.0
    adv: float = 0.5
    bn_momentum: float = 0.0  # blend batch BN statistics with earlier rounds' (Fast: 0.9)
    reset_generator: bool = True  # re-initialize G every round (CMI, CSD)


class GeneratorSynthesizer(Synthesizer):
    """Base for methods that invert the teacher through a DCGAN-style generator."""

    def __init__(self, ctx: SynthContext, cfg: GeneratorConfig):
        super().__init__(ctx, cfg)
        c, h, _ = ctx.image_shape
        self.generator = Generator(cfg.nz, cfg.ngf, h, c)
        self.bn_stats = BNStatistics(ctx.teacher, momentum=cfg.bn_momentum, active=False)  # on in synthesis only
        self.augment = crop_flip(h)
        self.adversarial = True  # off during warm-up epochs

    # ---------------------------------------------------------------- hooks

    def on_epoch_start(self, epoch: int, warmup: bool) -> None:
        self.adversarial = not warmup

    def round_generator(self) -> nn.Module:
        """The generator this round optimizes. Default: the method's own, re-initialized if configured."""
        if self.cfg.reset_generator:
            self.generator.reset_parameters()
        return self.generator

    def round_targets(self, n: int) -> torch.Tensor:
        """The classes the round's CE term asks the teacher for. Default: uniform at random (CMI, Fast, CSD)."""
        return torch.randint(self.ctx.num_classes, (n,), device=self.ctx.device)

    def extra_terms(self, images: torch.Tensor, x: torch.Tensor, y: torch.Tensor,
                    t_logits: torch.Tensor, s_logits: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """Weighted loss terms added to BN + CE + adv. ``images`` in [0, 1], ``x`` augmented and normalized;
        ``s_logits`` is None when the adversarial term is off (the student forward is skipped)."""
        return {}

    def after_backward(self) -> None:
        """Called after each inner backward pass, before the optimizer step."""

    def on_best_step(self) -> None:
        """Called when a step's images become the round's best batch (before that step's update)."""


    def get_extra_state(self) -> dict[str, Any]:
        # the BN-statistics moving average belongs to no module, so checkpoints need it spelled out;
        # subclasses extend this dict through super()
        return {"bn_stats": self.bn_stats.state_dict()}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.bn_stats.load_state_dict(state["bn_stats"])

    # ---------------------------------------------------------------- the loop

    def synthesize(self) -> SynthBatch:
        with self.bn_stats.recording():
            return self._synthesize()

    def _synthesize(self) -> SynthBatch:
        cfg, ctx = self.cfg, self.ctx
        n = ctx.synth_batch_size
        generator = self.round_generator()
        generator.train()
        z = torch.randn(n, cfg.nz, device=ctx.device, requires_grad=cfg.lr_z > 0)
        y = self.round_targets(n)
        groups = [{"params": list(generator.parameters()), "lr": cfg.lr_g}]
        if cfg.lr_z > 0:  # lr_z 0: the latents stay as drawn (SpaceshipNet)
            groups.append({"params": [z], "lr": cfg.lr_z})
        opt = torch.optim.Adam(groups, betas=(cfg.beta1, cfg.beta2))
        adversarial = self.adversarial and cfg.adv > 0

        def forward() -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
            images = generator(z)
            x = ctx.normalizer(self.augment(images))
            with ctx.autocast():
                t = ctx.teacher(x).float()
                # the student's logits only feed the adversarial term: skip its forward otherwise
                s = ctx.student(x).float() if adversarial else None
            terms = {"bn": cfg.bn * self.bn_stats.loss(), "ce": cfg.oh * F.cross_entropy(t, y)}
            if adversarial:
                terms["adv"] = cfg.adv * adversarial_loss(s, t)
            terms.update(self.extra_terms(images, x, y, t, s))
            return images, terms

        run = invert(opt, cfg.g_steps, forward, on_best=self.on_best_step, after_backward=self.after_backward)
        self.bn_stats.update_ema()
        batch = SynthBatch(run.kept, y, {**run.last_terms, "total": run.curve[-1]}, run.curve,
                           teacher_passes=n * cfg.g_steps)
        self.after_round(batch)
        self.bn_stats.clear()
        return batch
