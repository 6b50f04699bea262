"""DFQ, data-free network quantization with adversarial knowledge distillation (Choi et al., CVPRW 2020),
as a distillation method: an adversarial generator that also matches the teacher's BatchNorm statistics.

The authors released no code. The reference is the datafree package's DFQ, as CMI's repository
runs it (``datafree/synthesis/generative.py``, ``datafree_kd.py``,
``scripts/dfq/dfq_cifar10_wrn402_wrn161.sh``); line numbers below are CMI's.

- Generator step (``generative.py`` l.52-75): a new latent batch through the generator (train
  mode), normalized, into the teacher with BN-statistics hooks and into the student (eval mode);
  ``bn * L_BN + oh * CE(t, argmax t) + adv * (-KL(t || s)) + balance * sum(p ln p)`` with the KL a
  batch mean at T 1 (no mask), ``p`` the batch-mean softmax. One step per round; Adam lr 1e-3,
  betas (0.5, 0.999), never reset.
- Student steps (``datafree_kd.py`` l.369-388): 10 per round, each on a new batch sampled with the
  generator in *eval* mode (``generative.py`` l.77-82: BN on its running statistics), not augmented.
  The loss is KL at T 1: ``datafree_kd.py`` l.259 reassigns ``criterion`` for the online methods,
  so the script's ``--T 20`` never reaches the student.
- Generator (``datafree/models/generator.py`` ``LargeGenerator``, l.42-68): linear to 4ngf x H/4 x
  W/4, BN, two x2-upsample + conv (no bias) + BN + LeakyReLU stages (2ngf, ngf), conv to C,
  sigmoid; nz 256, ngf 64, PyTorch's default init.
- Fast-Datafree's copy of the same script builds this synthesizer with ``student=teacher``
  (its ``datafree_kd.py`` l.270), which makes the adversarial term the teacher against itself,
  zero: we follow CMI's, where it is the student.

Defaults and the ``paper`` preset follow that script (CIFAR-10, WRN-40-2 -> WRN-16-1: batch 256,
lr 0.1, 200 epochs x 400 student steps, kd_steps 10, bn 1, oh 1, adv 1, balance 20).
See docs/methods/online.md.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from dfkd_bench.losses import BNStatistics, kl_divergence, mean_prediction_neg_entropy, require_batchnorm
from dfkd_bench.method import SynthBatch
from dfkd_bench.online import OnlineConfig, OnlineSynthesizer, package_generator
from dfkd_bench.presets import CPU_PROTOCOL, ONLINE_PROTOCOL, QUICK_PROTOCOL
from dfkd_bench.registry import SYNTHESIZERS, register_preset


@dataclass
class DFQConfig(OnlineConfig):
    nz: int = 256
    lr_g: float = 1e-3
    beta1: float = 0.5
    sample_eval: bool = True
    bn: float = 1.0  # BN-statistics weight
    oh: float = 1.0  # one-hot: CE of the teacher's logits against their own argmax
    adv: float = 1.0  # adversarial: minus KL(teacher || student), batch mean, T 1
    balance: float = 20.0  # class balance, sum(p ln p) of the batch-mean prediction


@SYNTHESIZERS.register
class DFQ(OnlineSynthesizer):
    name = "dfq"
    summary = "online generator: BN statistics + one-hot + adversarial KL + class balance"
    Config = DFQConfig

    def __init__(self, ctx, cfg: DFQConfig):
        super().__init__(ctx, cfg)
        require_batchnorm(ctx.teacher)  # refused now, not at the first round
        self.bn_stats: BNStatistics | None = None  # hooked on the teacher during the generator steps only

    def build_generator(self) -> nn.Module:
        c, h, _ = self.ctx.image_shape
        return package_generator(self.cfg.nz, h, c)

    def generator_terms(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        cfg = self.cfg
        t, s = self.teacher_student(x)
        return {
            "bn": cfg.bn * self.bn_stats.loss(),
            "ce": cfg.oh * F.cross_entropy(t, t.argmax(1)),
            "adv": cfg.adv * -kl_divergence(s, t, 1.0),
            "balance": cfg.balance * mean_prediction_neg_entropy(t),
        }

    def synthesize(self) -> SynthBatch:
        # hooks only for the generator steps: the student steps' teacher passes need no BN statistics
        self.bn_stats = BNStatistics(self.ctx.teacher)
        try:
            return super().synthesize()
        finally:
            self.bn_stats.remove()
            self.bn_stats = None


# One batch size for generator and student, no augmentation, KL at T 1 for the student (see above). The shared
# budget is the student's (epochs x ep_steps steps of batch_size, presets.py); DFQ's round is one generator
# step and 10 student steps, so kd_steps is the method's own.
_ONLINE = {**ONLINE_PROTOCOL, "temperature": 1.0, "kd_steps": 10}

# CMI scripts/dfq/dfq_cifar10_wrn402_wrn161.sh (CIFAR-10, WRN-40-2 -> WRN-16-1); CMI datafree_kd.py's student
# optimizer: SGD momentum 0.9, wd 1e-4 (its default), cosine over the 200 epochs down to 0 (l.290).
register_preset("dfq", "paper", {
    "epochs": 200, "ep_steps": 400, "kd_steps": 10, "batch_size": 256, "synth_batch_size": 256,
    "lr": 0.1, "momentum": 0.9, "weight_decay": 1e-4, "temperature": 1.0, "kd_augment": False,
    "method.g_steps": 1, "method.lr_g": 1e-3, "method.bn": 1.0, "method.oh": 1.0, "method.adv": 1.0,
    "method.balance": 20.0,
})
register_preset("dfq", "quick", {**QUICK_PROTOCOL, **_ONLINE})
register_preset("dfq", "cpu", {**CPU_PROTOCOL, **_ONLINE})
