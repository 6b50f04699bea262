"""ZSKT, zero-shot knowledge transfer via adversarial belief matching (Micaelli & Storkey, NeurIPS 2019).

A generator and the student play a game on a pseudo batch: the generator takes a step to make the
batch one where the student disagrees most with the teacher (maximizing their KL), then the student
takes ``n_student_iter`` steps on that same batch to match the teacher, with attention transfer on
the networks' stage outputs.

Reference: the authors' code (polo5/ZeroShotKnowledgeTransfer); ``solver.py`` line numbers below.

- Pseudo batches (l.34-35, 88-117; ``utils/loaders.py`` l.27-51): one latent batch z for
  ``n_generator_iter + n_student_iter`` iterations; the generator steps on it first, then every
  student step uses G(z). Here: a round draws z, takes ``g_steps`` generator steps on it, and its
  ``kd_steps`` student steps all learn from G(z) after those steps (``fixed_batch``; computed once
  per round: the generator does not change during the student steps, and its train-mode BN gives
  the same output for the same batch).
- Generator (``models/generator.py`` l.15-37): linear to 128 x H/4 x W/4, BN, two x2-upsample + conv
  + BN + LeakyReLU stages (128, 64), conv to C, then an affine BN: no squashing, the output goes to
  the networks as normalized images (l.89-95); PyTorch's default init. Images are its
  ``normalizer.inverse`` (see :mod:`dfkd_bench.online`).
- Generator loss (l.217-228): minus ``F.kl_div(log_softmax(s / T), softmax(t / T))`` with
  PyTorch's default reduction, the mean over batch *and* classes; T 1 in every script.
  The student is in train mode during this step (l.31, 196: never switched to eval for it).
  Gradient norm clipped at 5 (l.100).
- Student loss (l.200-243): the same KL (mean over batch and classes, T 1, no T^2) +
  ``beta * sum_stages mean((a_s - a_t)^2)``, ``a = normalize(mean_c(x^2))`` per sample; beta 250.
  That is the ``zskt`` distillation loss below; its maps come from forward hooks on
  ``zoo.stage_modules`` (a WRN's three block groups, as the authors' ``activation1..3``).
  Gradient norm clipped at 5 (l.115): the runner's ``grad_clip`` (the ``paper`` preset sets 5).
- Optimizers (l.39-42, 169-171): Adam for both (generator lr 1e-3, student 2e-3, no weight decay),
  each with a cosine schedule over all pseudo batches. The ``paper`` preset sets the runner's
  ``optimizer adam``, ``lr 2e-3``, ``weight_decay 0``; the runner steps its cosine once per epoch
  (200 steps over the run, not one per pseudo batch). The generator's lr follows the student's
  schedule (``lr_g_schedule``).

Defaults follow the authors' CIFAR-10 scripts (``scripts/ZeroShot/main*.sh``: nz 100, lr_G 1e-3,
n_generator_iter 1, n_student_iter 10, batch 128, T 1, beta 250); ``package`` is the datafree
package's ZSKT. See docs/methods/online.md.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from dfkd_bench.errors import DfkdError
from dfkd_bench.generator import ReferenceGenerator
from dfkd_bench.method import DistillLoss, LossContext, Outputs, SynthBatch
from dfkd_bench.online import OnlineConfig, OnlineSynthesizer
from dfkd_bench.presets import CPU_PROTOCOL, ONLINE_PROTOCOL, QUICK_PROTOCOL
from dfkd_bench.registry import LOSSES, SYNTHESIZERS, register_preset
from dfkd_bench.settings import LossSettings, choice
from dfkd_bench.zoo import stage_modules


def class_mean_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """KL(softmax(t/T) || softmax(s/T)) averaged over batch and classes (``F.kl_div``'s default), no T^2."""
    log_p_s = F.log_softmax(student_logits.float() / temperature, 1)
    return F.kl_div(log_p_s, F.softmax(teacher_logits.float() / temperature, 1), reduction="none").mean()


def attention_map(x: torch.Tensor) -> torch.Tensor:
    """Per-sample spatial attention: the channel mean of x^2, flattened and L2-normalized."""
    return F.normalize(x.float().pow(2).mean(1).flatten(1), dim=1)


def attention_transfer(student_maps: list[torch.Tensor], teacher_maps: list[torch.Tensor]) -> torch.Tensor:
    """Sum over stages of the mean squared difference of the attention maps."""
    return sum((attention_map(s) - attention_map(t)).pow(2).mean() for s, t in zip(student_maps, teacher_maps))


@dataclass
class ZSKTConfig(OnlineConfig):
    nz: int = 100
    lr_g: float = 1e-3
    grad_clip: float = 5.0
    lr_g_schedule: bool = True
    student_bn_train: bool = True
    fixed_batch: bool = True  # the round's student steps all learn from the round's pseudo batch
    generator: str = choice("authors", "package")  # authors' (affine-BN output), or CMI's LargeGenerator (sigmoid)


@SYNTHESIZERS.register
class ZSKT(OnlineSynthesizer):
    name = "zskt"
    summary = "adversarial generator maximizing the teacher-student KL; student: KL + attention transfer"
    default_loss = "zskt"
    Config = ZSKTConfig

    def __init__(self, ctx, cfg: ZSKTConfig):
        super().__init__(ctx, cfg)
        # within a round only (checkpoints fall between rounds): its latents and G(z) after its generator steps
        self.z: torch.Tensor | None = None
        self.batch: torch.Tensor | None = None

    def authors_generator(self, image_size: int, channels: int) -> nn.Module:
        return ReferenceGenerator(self.cfg.nz, (128, 128, 64), image_size, channels, "bn")

    def round_latents(self) -> None:
        self.z = torch.randn(self.ctx.synth_batch_size, self.cfg.nz, device=self.ctx.device)
        self.batch = None

    def step_latents(self) -> torch.Tensor:
        return self.z if self.cfg.fixed_batch else super().step_latents()

    def generator_terms(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        t, s = self.teacher_student(x)
        return {"adv": -class_mean_kl(s, t)}

    @torch.no_grad()
    def sample(self, n: int) -> SynthBatch:
        if not self.cfg.fixed_batch:
            return super().sample(n)
        if self.batch is not None and len(self.batch) >= n:
            return SynthBatch(self.batch[:n], reused=True)  # the round's pseudo batch again: no new images
        z = self.z
        if len(z) < n:  # a student batch larger than the generator's: the pseudo batch gets more latents
            z = torch.cat([z, torch.randn(n - len(z), self.cfg.nz, device=z.device)])
        self.generator.train(not self.cfg.sample_eval)
        self.batch = self.to_images(self.generator(z))
        return SynthBatch(self.batch[:n])


@LOSSES.register
class ZSKTLoss(DistillLoss):
    name = "zskt"
    summary = "ZSKT's student loss: KL averaged over batch and classes (no T^2) + beta * attention transfer"

    @dataclass
    class Config(LossSettings):
        beta: float = 250.0  # attention transfer weight (0: KL only)

    def __init__(self, ctx: LossContext, cfg: Config):
        super().__init__(ctx, cfg)
        self._maps: dict[str, list[torch.Tensor]] = {"student": [], "teacher": []}
        self._stages: dict[str, int] = {}
        if cfg.beta > 0:
            self._hook(ctx.student, "student")
            self._hook(ctx.teacher, "teacher")
            self._check_maps()

    def _hook(self, model: nn.Module, key: str) -> None:
        def keep(module, inputs, output):
            maps = self._maps[key]
            if len(maps) == self._stages[key]:  # a new forward pass starts
                maps.clear()
            maps.append(output)

        modules = stage_modules(model)
        self._stages[key] = len(modules)
        for m in modules:
            m.register_forward_hook(keep)

    def _check_maps(self) -> None:
        """Attention transfer pairs the stages one to one: same count, same spatial sizes."""
        c, h, _ = self.ctx.image_shape
        shapes = {}
        for key, model in (("student", self.ctx.student), ("teacher", self.ctx.teacher)):
            was_training = model.training
            model.eval()
            p = next(model.parameters())
            with torch.no_grad():
                model(torch.zeros(2, c, h, h, device=p.device, dtype=p.dtype))
            model.train(was_training)
            shapes[key] = [tuple(m.shape[-2:]) for m in self._maps[key]]
            self._maps[key].clear()
        if shapes["student"] != shapes["teacher"]:
            raise DfkdError(f"the zskt loss pairs teacher and student stages for attention transfer, but their "
                            f"feature maps differ ({shapes['teacher']} vs {shapes['student']}); "
                            f"use networks of one family or --set loss.beta=0")

    def forward(self, s: Outputs, t: Outputs, y: torch.Tensor | None) -> dict[str, torch.Tensor]:
        terms = {"kd": class_mean_kl(s.logits, t.logits, self.ctx.temperature)}
        if self.cfg.beta > 0:
            terms["at"] = self.cfg.beta * attention_transfer(self._maps["student"], self._maps["teacher"])
            for maps in self._maps.values():  # the maps hold the step's graph: let it go with the loss
                maps.clear()
        return terms


# The authors' generator and student use one batch size; their student never sees augmented images. The
# shared budget is the student's (epochs x ep_steps steps of batch_size, presets.py); ZSKT's round is one
# generator step and 10 student steps on its batch (n_student_iter), so kd_steps is the method's own.
_ONLINE = {**ONLINE_PROTOCOL, "temperature": 1.0, "kd_steps": 10}

# scripts/ZeroShot/main2.sh (CIFAR-10, WRN-40-2 -> WRN-16-1): 8e4 pseudo batches of 1 generator + 10 student
# iterations, batch 128 = 200 epochs x 400 rounds. The student: solver.py's Adam (lr 2e-3, no weight decay,
# cosine) with its gradient norm clipped at 5.
register_preset("zskt", "paper", {
    "epochs": 200, "ep_steps": 4000, "kd_steps": 10, "batch_size": 128, "synth_batch_size": 128,
    "optimizer": "adam", "lr": 2e-3, "weight_decay": 0.0, "grad_clip": 5.0, "temperature": 1.0, "kd_augment": False,
    "method.g_steps": 1, "method.nz": 100, "method.lr_g": 1e-3, "loss.beta": 250.0,
})
# The datafree package's ZSKT (CMI scripts/zskt/zskt_cifar10_wrn402_wrn161.sh): a generator step on new
# latents, then 5 student steps on new samples (generator in eval mode) with KL at T 1 (the script's --T 20
# is overridden by datafree_kd.py's reassigned `criterion`), no attention transfer, no clipping; the student's
# cosine anneals to 0 (CMI datafree_kd.py l.290).
register_preset("zskt", "package", {
    "epochs": 200, "ep_steps": 400, "kd_steps": 5, "batch_size": 256, "synth_batch_size": 256,
    "lr": 0.1, "momentum": 0.9, "weight_decay": 1e-4, "temperature": 1.0, "kd_augment": False,
    "loss": "kl", "method.generator": "package", "method.g_steps": 1, "method.nz": 256, "method.lr_g": 1e-3,
    "method.beta1": 0.5, "method.grad_clip": 0.0, "method.lr_g_schedule": False, "method.student_bn_train": False,
    "method.fixed_batch": False, "method.sample_eval": True,
})
register_preset("zskt", "quick", {**QUICK_PROTOCOL, **_ONLINE})
register_preset("zskt", "cpu", {**CPU_PROTOCOL, **_ONLINE})
