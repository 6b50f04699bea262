"""DFAD, data-free adversarial distillation (Fang et al., 2019).

A min-max game on the L1 distance between teacher and student logits: the student takes a few
steps to close it on new generated batches, then the generator takes one step to open it again
("hard samples"), which estimates an upper bound of the teacher-student discrepancy.

Reference: the authors' ``DFAD_cifar.py`` (VainF/Data-Free-Adversarial-Distillation); line numbers
below are that file's.

- Iteration (l.23-46): 5 student steps, each on a new latent batch through the generator (train
  mode, detached), loss ``F.l1_loss(s, t)``; then one generator step on a new batch, loss
  ``-F.l1_loss(s, t)``. Both networks stay in train mode throughout (l.18-20): the student's BN
  uses batch statistics in the generator step too (``student_bn_train``). Here a round is the
  generator step followed by ``kd_steps`` (5) student steps: the same alternation, started from
  the generator's side.
- Generator ``GeneratorA`` (``network/gan.py`` l.12-44, l.139): linear to 2ngf x H/4 x W/4, BN,
  two x2-upsample + conv + BN + LeakyReLU stages (2ngf, ngf), conv to C, tanh, a BN without affine;
  nz 256, ngf 64, PyTorch's default init. Its output goes to the networks unnormalized, so it lives
  in the normalized space: images are its ``normalizer.inverse`` (see :mod:`dfkd_bench.online`).
- Optimizers (l.150-155): the student SGD lr 0.1, momentum 0.9, wd 5e-4; the generator Adam lr 1e-3
  (default betas). With ``--scheduler`` (the README's CIFAR commands) both lrs drop x0.1 at epochs
  100 and 200 of 500 (50 iterations each; l.161-165 step both schedulers at the start of the 1-based
  epoch, so the 0-based epochs 99 and 199 are the first at the lower lr). The ``paper`` preset sets
  that step schedule (``lr_schedule step``, milestones 99, 199); the generator's lr follows the
  student's (``lr_g_schedule``).
- Student loss: ``l1``, the mean absolute logit difference (registered below); no augmentation.

The ``paper`` preset is the README's CIFAR-10 command (ResNet-34 -> ResNet-18); ``package`` is the
datafree package's DFAD (Fast-Datafree ``scripts/dfad_cifar.sh`` run with CMI's ``datafree_kd.py``).
See docs/methods/online.md.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from dfkd_bench.generator import ReferenceGenerator
from dfkd_bench.method import DistillLoss, Outputs
from dfkd_bench.online import OnlineConfig, OnlineSynthesizer
from dfkd_bench.presets import CPU_PROTOCOL, ONLINE_PROTOCOL, QUICK_PROTOCOL
from dfkd_bench.registry import LOSSES, SYNTHESIZERS, register_preset
from dfkd_bench.settings import LossSettings, choice


@dataclass
class DFADConfig(OnlineConfig):
    nz: int = 256
    lr_g: float = 1e-3
    lr_g_schedule: bool = True
    student_bn_train: bool = True
    generator: str = choice("authors", "package")  # authors' GeneratorA (tanh + BN), or CMI's LargeGenerator (sigmoid)


@SYNTHESIZERS.register
class DFAD(OnlineSynthesizer):
    name = "dfad"
    summary = "adversarial generator maximizing the L1 teacher-student logit gap; student minimizes it"
    default_loss = "l1"
    Config = DFADConfig

    def authors_generator(self, image_size: int, channels: int) -> nn.Module:
        return ReferenceGenerator(self.cfg.nz, (128, 128, 64), image_size, channels, "tanh_bn")

    def generator_terms(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        t, s = self.teacher_student(x)
        return {"adv": -F.l1_loss(s, t)}


@LOSSES.register
class L1Loss(DistillLoss):
    name = "l1"
    summary = "mean absolute difference of student and teacher logits (DFAD)"

    @dataclass
    class Config(LossSettings):
        pass

    def forward(self, s: Outputs, t: Outputs, y: torch.Tensor | None) -> dict[str, torch.Tensor]:
        return {"l1": F.l1_loss(s.logits.float(), t.logits.float())}


# One batch size for generator and student, no augmentation of the student's batches. The shared budget is
# the student's (epochs x ep_steps steps of batch_size, presets.py); DFAD's round is one generator step and
# 5 student steps, so kd_steps is the method's own.
_ONLINE = {**ONLINE_PROTOCOL, "kd_steps": 5}

# README, CIFAR-10 (ResNet-34 -> ResNet-18): 500 epochs x 50 iterations of 5 student + 1 generator steps,
# batch 256, lr_S 0.1 and wd 5e-4, both lrs cut x0.1 with --scheduler (0-based epochs 99 and 199, see above).
register_preset("dfad", "paper", {
    "epochs": 500, "ep_steps": 250, "kd_steps": 5, "batch_size": 256, "synth_batch_size": 256,
    "lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4, "lr_schedule": "step", "lr_milestones": (99, 199),
    "kd_augment": False,
    "method.g_steps": 1, "method.nz": 256, "method.lr_g": 1e-3,
})
# The datafree package's DFAD (Fast-Datafree scripts/dfad_cifar.sh, which CMI's datafree_kd.py also runs): its
# generator, Adam betas (0.5, 0.999), the student in eval mode for the generator step, new samples for each of
# 5 student steps (generator in eval mode), L1 for the student too (datafree_kd.py reassigns `criterion`);
# the student's cosine anneals to 0 (CMI datafree_kd.py l.290; Fast-Datafree's copy, which builds this
# synthesizer with student=teacher, anneals to 2e-4).
register_preset("dfad", "package", {
    "epochs": 200, "ep_steps": 400, "kd_steps": 5, "batch_size": 256, "synth_batch_size": 256,
    "lr": 0.1, "momentum": 0.9, "weight_decay": 1e-4, "kd_augment": False,
    "method.generator": "package", "method.g_steps": 1, "method.nz": 256, "method.lr_g": 1e-3, "method.beta1": 0.5,
    "method.lr_g_schedule": False, "method.student_bn_train": False, "method.sample_eval": True,
})
register_preset("dfad", "quick", {**QUICK_PROTOCOL, **_ONLINE})
register_preset("dfad", "cpu", {**CPU_PROTOCOL, **_ONLINE})
