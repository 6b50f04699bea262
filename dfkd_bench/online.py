"""The loop the online adversarial methods share (DAFL, ZSKT, DFAD, DFQ).

One generator lives for the whole run. Every round (``synthesize``) takes ``g_steps`` Adam steps on
it with the method's loss (``generator_terms``); then, for each of the round's ``kd_steps`` student
steps, ``sample`` hands the runner a batch drawn from it. Nothing is pooled (``batch_source =
"fresh"``), so the student always learns from the current generator, as in these methods' code.

A generator whose output lives in the dataset's normalized space (the authors' DAFL, DFAD and ZSKT
generators end in a BatchNorm) feeds that output to the teacher as it is, as their code does; the
images handed to the runner are its exact pre-image under the normalization
(``normalizer.inverse``), so the student sees the same tensor the authors' student sees. They are
not clipped to [0, 1]: the authors' generators are not bounded to the data range either.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from .generator import ReferenceGenerator
from .inversion import invert
from .method import SynthBatch, SynthContext, Synthesizer
from .settings import MethodSettings, at_least


def package_generator(nz: int, image_size: int, channels: int) -> ReferenceGenerator:
    """The datafree package's generator for its online methods (CMI's ``LargeGenerator``, ngf 64):
    256 -> 128 -> 64 channels, convs without bias, sigmoid output in [0, 1]."""
    return ReferenceGenerator(nz, (256, 128, 64), image_size, channels, "sigmoid", conv_bias=False)


@dataclass
class OnlineConfig(MethodSettings):
    """Settings every online method has; a method's Config subclasses this with its authors' values."""

    g_steps: int = at_least(1, default=1)  # generator steps per round (a round is followed by kd_steps student steps)
    lr_g: float = 1e-3
    beta1: float = 0.9  # Adam's defaults, as the authors' code; the datafree package uses 0.5
    beta2: float = 0.999
    nz: int = 100
    grad_clip: float = 0.0  # clip the generator's gradient norm (ZSKT: 5); 0: off
    lr_g_schedule: bool = False  # the generator's lr follows the student's schedule (ZSKT, DFAD step both)
    student_bn_train: bool = False  # the generator step runs the student in train mode (ZSKT, DFAD code)
    sample_eval: bool = False  # draw the student's batches with the generator in eval mode (CMI's package)


class OnlineSynthesizer(Synthesizer):
    """Base of the online methods: a persistent generator, trained a few steps per round."""

    batch_source = "fresh"

    def __init__(self, ctx: SynthContext, cfg: OnlineConfig):
        super().__init__(ctx, cfg)
        self.generator = self.build_generator()
        self.optimizer = torch.optim.Adam(self.generator.parameters(), lr=cfg.lr_g, betas=(cfg.beta1, cfg.beta2))
        self.student_lr0 = 0.0  # the student's first learning rate, the reference of lr_g_schedule

    # ---------------------------------------------------------------- what a method supplies

    def build_generator(self) -> nn.Module:
        """The generator ``cfg.generator`` names: the authors' (``authors_generator``) or the datafree
        package's. It has a ``normalized_output`` attribute."""
        c, h, _ = self.ctx.image_shape
        if self.cfg.generator == "package":
            return package_generator(self.cfg.nz, h, c)
        return self.authors_generator(h, c)

    def authors_generator(self, image_size: int, channels: int) -> nn.Module:
        """The generator of the method's own code."""
        raise NotImplementedError

    def generator_terms(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """The weighted terms the generator step minimizes, on the normalized batch ``x``."""
        raise NotImplementedError

    def round_latents(self) -> None:
        """Called once at the start of each round (ZSKT draws the round's fixed latent batch here)."""

    def step_latents(self) -> torch.Tensor:
        """The latent batch of one generator step (default: a fresh one)."""
        return torch.randn(self.ctx.synth_batch_size, self.cfg.nz, device=self.ctx.device)

    def last_step_images(self, images: torch.Tensor) -> None:
        """Called once per round with the last generator step's images (pixels, before that step's update,
        detached); DAFL keeps them for the student's next step. Default: nothing."""

    # ---------------------------------------------------------------- the loop

    def network_input(self, out: torch.Tensor) -> torch.Tensor:
        """Generator output -> the teacher's input (normalized space)."""
        return out if self.generator.normalized_output else self.ctx.normalizer(out)

    def to_images(self, out: torch.Tensor) -> torch.Tensor:
        """Generator output -> the images handed to the runner (pixel space; see the module docstring)."""
        return self.ctx.normalizer.inverse(out) if self.generator.normalized_output else out

    def on_epoch_start(self, epoch: int, warmup: bool) -> None:
        lr = self.ctx.student_lr
        if not self.cfg.lr_g_schedule or lr <= 0:  # lr 0: the runner has not set it (a bare synthesize call)
            return
        if self.student_lr0 <= 0:
            self.student_lr0 = lr
        for group in self.optimizer.param_groups:
            group["lr"] = self.cfg.lr_g * lr / self.student_lr0

    def synthesize(self) -> SynthBatch:
        cfg, ctx = self.cfg, self.ctx
        self.generator.train()
        if cfg.student_bn_train:
            ctx.student.train()  # BN on batch statistics, running statistics updated, as in the authors' loop
        self.round_latents()

        def forward() -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
            out = self.generator(self.step_latents())
            return out, self.generator_terms(self.network_input(out))

        def clip() -> None:
            nn.utils.clip_grad_norm_(self.generator.parameters(), cfg.grad_clip)

        run = invert(self.optimizer, cfg.g_steps, forward, keep_best=False,
                     after_backward=clip if cfg.grad_clip > 0 else None)
        if cfg.student_bn_train:
            ctx.student.eval()
        self.last_step_images(self.to_images(run.last_images))
        empty = torch.empty(0, *ctx.image_shape, device=ctx.device)
        batch = SynthBatch(empty, None, {**run.last_terms, "total": run.curve[-1]}, run.curve,
                           teacher_passes=ctx.synth_batch_size * cfg.g_steps)
        self.after_round(batch)
        return batch

    @torch.no_grad()
    def draw(self, n: int) -> torch.Tensor:
        """``n`` new images from the current generator (train-mode BN unless ``sample_eval``)."""
        self.generator.train(not self.cfg.sample_eval)
        z = torch.randn(n, self.cfg.nz, device=self.ctx.device)
        return self.to_images(self.generator(z))

    def sample(self, n: int) -> SynthBatch:
        return SynthBatch(self.draw(n))

    # ---------------------------------------------------------------- checkpoints

    def get_extra_state(self) -> dict[str, Any]:
        # the generator's Adam moments and the schedule's reference belong to no module
        return {"optimizer": self.optimizer.state_dict(), "student_lr0": self.student_lr0}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.student_lr0 = state["student_lr0"]
