"""DAFL, data-free learning of student networks (Chen et al., ICCV 2019).

The teacher is a fixed discriminator: a generator learns to make images the teacher classifies
confidently (one-hot term), that excite its penultimate features (activation term) and whose
predictions, averaged over the batch, cover every class (information-entropy term). Each
iteration takes one generator step and one student step on that same batch.

Reference: the authors' ``DAFL-train.py`` (huawei-noah). Line numbers below are that file's.

- Generator (l.54-86): linear to 128 x H/4 x W/4, BN, two x2-upsample + conv + BN + LeakyReLU
  stages (128 and 64 channels, conv biases, the two BNs built as ``BatchNorm2d(c, 0.8)``: eps 0.8),
  conv to C channels, tanh, a BN without affine; PyTorch's default init. Its output goes to the
  teacher unnormalized (l.173-174), so it lives in the normalized space: our images are
  ``normalizer.inverse`` of it (see :mod:`dfkd_bench.online`).
- Loss (l.175-180): ``oh * CE(t, argmax t) + ie * sum(p log10 p) + a * (-mean |f|)`` with ``p`` the
  batch-mean softmax and ``f`` the teacher's pooled penultimate features. Note log10 (the datafree
  package uses ln: its ``balance`` 20 is ``ie`` = 20 / ln 10 = 8.686 here).
- One generator step and one student step per iteration on the same batch (l.168-185): the student
  learns from ``gen_imgs.detach()``, the images of the generator step (before its update). We do
  the same: the round's first ``sample`` returns the generator step's batch (``reuse_batch``);
  further student steps of a round (``kd_steps`` > 1, the package's setting) draw new batches.
- Student loss (l.97-101, 181): KL(t || s) summed and divided by the batch, no temperature: ``kl``
  with ``temperature`` 1. No augmentation of the student's batches (``kd_augment`` false).
- Optimizers: Adam for the generator (lr_G 0.2 for MNIST, 0.02 for CIFAR; default betas);
  the student: Adam lr 2e-3 on MNIST, SGD lr 0.1, momentum 0.9, wd 5e-4 on CIFAR with the lr cut
  x0.1 at epochs 800 and 1600 of 2000 (l.117-118, 140-153; ``adjust_learning_rate`` on the 0-based
  epoch). The ``paper`` preset (CIFAR) sets that step schedule (``lr_schedule step``, milestones 800,
  1600); the MNIST Adam student is the runner's ``optimizer adam`` with ``lr 2e-3``.

Defaults are the code's argparse defaults (its MNIST settings: nz 100, lr_G 0.2, oh 1, ie 5,
a 0.1); the ``paper`` preset is the README's CIFAR-10 command, whose generator settings the
``quick`` and ``cpu`` presets also use (the runner's student is the CIFAR recipe's: a BN network,
SGD); ``package`` is the datafree package's DAFL (CMI's ``scripts/dafl/dafl_cifar10_wrn402_wrn161.sh``).
See docs/methods/online.md.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from dfkd_bench.generator import ReferenceGenerator
from dfkd_bench.losses import mean_prediction_neg_entropy
from dfkd_bench.method import SynthBatch
from dfkd_bench.online import OnlineConfig, OnlineSynthesizer
from dfkd_bench.presets import CPU_PROTOCOL, ONLINE_PROTOCOL, QUICK_PROTOCOL
from dfkd_bench.registry import SYNTHESIZERS, register_preset
from dfkd_bench.settings import choice


@dataclass
class DAFLConfig(OnlineConfig):
    nz: int = 100
    lr_g: float = 0.2
    oh: float = 1.0  # one-hot: CE of the teacher's logits against their own argmax
    ie: float = 5.0  # information entropy, sum(p log10 p) of the batch-mean prediction
    act: float = 0.1  # activation: minus the mean |penultimate feature| of the teacher
    reuse_batch: bool = True  # the round's first student step learns from the generator step's batch
    generator: str = choice("authors", "package")  # authors' (tanh + BN, eps 0.8), or CMI's LargeGenerator (sigmoid)


@SYNTHESIZERS.register
class DAFL(OnlineSynthesizer):
    name = "dafl"
    summary = "online generator: one-hot + activation + information entropy; student on its batches"
    Config = DAFLConfig

    def __init__(self, ctx, cfg: DAFLConfig):
        super().__init__(ctx, cfg)
        self.pending: torch.Tensor | None = None  # the generator step's batch, for the round's first student step

    def authors_generator(self, image_size: int, channels: int) -> nn.Module:
        return ReferenceGenerator(self.cfg.nz, (128, 128, 64), image_size, channels, "tanh_bn", bn_eps=0.8)

    def generator_terms(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        cfg, teacher = self.cfg, self.ctx.teacher
        with self.ctx.autocast():
            features = teacher.forward_features(x)
            pooled = teacher.forward_head(features, pre_logits=True).float()
            logits = teacher.forward_head(features).float()
        return {
            "oh": cfg.oh * F.cross_entropy(logits, logits.argmax(1)),
            "ie": cfg.ie * mean_prediction_neg_entropy(logits) / math.log(10),
            "act": cfg.act * -pooled.abs().mean(),
        }

    def last_step_images(self, images: torch.Tensor) -> None:
        self.pending = images if self.cfg.reuse_batch else None

    def sample(self, n: int) -> SynthBatch:
        if self.pending is not None and len(self.pending) >= n:
            images, self.pending = self.pending[:n], None
            return SynthBatch(images)
        return super().sample(n)


# README, CIFAR-10 (ResNet-34 -> ResNet-18) generator settings.
_CIFAR = {"method.nz": 1000, "method.lr_g": 0.02, "method.oh": 0.05, "method.ie": 5.0, "method.act": 0.01}

# README, CIFAR-10: 2000 epochs x 120 iterations, batch 1024, lr_S 0.1 (SGD, momentum 0.9, wd 5e-4), cut
# x0.1 from the (0-based) epochs 800 and 1600 on.
register_preset("dafl", "paper", {
    "epochs": 2000, "ep_steps": 120, "kd_steps": 1, "batch_size": 1024, "synth_batch_size": 1024,
    "lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4, "lr_schedule": "step", "lr_milestones": (800, 1600),
    "temperature": 1.0, "kd_augment": False,
    "method.g_steps": 1, **_CIFAR,
})

# The authors' generator and the student both use one batch size, and their student never sees augmented
# images. The shared budget is the student's: epochs x ep_steps SGD steps of batch_size (presets.py); an
# online method's round is its own generator:student step ratio (DAFL 1:1), so kd_steps is the method's.
# The generator takes the README's CIFAR settings, the authors' recipe for a BN network distilled with SGD
# as the runner's student is: with the code's MNIST defaults (made for LeNet-5 and an Adam student) the
# quick run ends at 11.43% on Fashion-MNIST, with these at 56.61% (seed 0; docs/methods/online.md).
_ONLINE = {**ONLINE_PROTOCOL, "temperature": 1.0, "kd_steps": 1, **_CIFAR}
# The datafree package's DAFL (CMI scripts/dafl/dafl_cifar10_wrn402_wrn161.sh; its student loss is KL at T 1
# whatever --T says, because datafree_kd.py reassigns `criterion`): one generator step, then 5 student steps
# on new samples drawn with the generator in eval mode; balance 20 on ln = ie 8.686 on log10; the student's
# cosine anneals to 0 (CMI datafree_kd.py l.290).
register_preset("dafl", "package", {
    "epochs": 200, "ep_steps": 400, "kd_steps": 5, "batch_size": 256, "synth_batch_size": 256,
    "lr": 0.1, "momentum": 0.9, "weight_decay": 1e-4, "temperature": 1.0, "kd_augment": False,
    "method.generator": "package", "method.g_steps": 1, "method.nz": 512, "method.lr_g": 1e-3, "method.beta1": 0.5,
    "method.oh": 1.0, "method.ie": 20 / math.log(10), "method.act": 0.001, "method.reuse_batch": False,
    "method.sample_eval": True,
})
register_preset("dafl", "quick", {**QUICK_PROTOCOL, **_ONLINE})
register_preset("dafl", "cpu", {**CPU_PROTOCOL, **_ONLINE})
