"""CPNet, coupling the generator with the teacher (ICCV 2025; code: LannCX/CPNet at 3f3d397).

A fork of NAYER (:mod:`dfkd_bench.methods.nayer`): the same label embeddings, noisy layer, loops, generator
life and kept lowest-loss batch. What CPNet changes, by the authors' code:

- **The generator mirrors the teacher.** Its body is the teacher read backwards: one block per chosen teacher
  BatchNorm layer ("node"), deepest first, each block upsampling to the next shallower node's resolution and
  producing that node's channel count (``datafree/models/generator.py:16-44`` derives the plan from a teacher
  pass; ``CoupledGenerator``, ``generator.py:285-355``). The nodes are per architecture (``_BN_NODES``,
  ``generator.py:8-13``): for a WRN the last BN and the first BN of each group (their inputs are the stem's and
  the groups' outputs), for a ResNet each stage's last ``bn2``, for a VGG the last BN of stages 1, 2, 3 and 5.
- **Feature coupling.** Each block's input (a generator feature map) is pulled by MSE towards the teacher's
  input to the matching node on the same step, re-standardized from its own batch statistics to the node's
  running statistics and detached (``hooks.py:139-152``, ``synthesis/cpnet.py:165-167``), weight 1.
- **Logit-space alignment.** With the adversarial term comes a term on the teacher's pooled features ``f``:
  ``|cos(f - (y * delta - b) P, 1 P)|`` with ``y`` the one-hot targets, ``delta = ln(0.9 (K - 1) / 0.1)`` (the
  logit gap of 0.1 label smoothing), ``b`` the classifier's bias and ``P`` the pseudo-inverse of the transposed
  classifier weight with singular values clamped at 0.1 (``synthesis/cpnet.py:75, 257-274``). It is added to
  the adversarial term and shares its weight (``cpnet.py:173-174``).
- **The adversarial term is the reverse KL**: ``-KL(p_s || p_t)`` on the samples where student and teacher
  agree (``kldiv(t_out, s_out)`` at ``cpnet.py:172``; NAYER has ``kldiv(s_out, t_out)``).
- **CutMix and colour jitter.** The teacher sees crop + flip + ColorJitter(0.1, 0.1, 0.1, 0.1, p=0.4)
  (``cpnet.py:83-88``), then kornia's CutMix (p=0.5) with the cross-entropy mixed in proportion
  (``cpnet.py:104, 155, 161, 276-280``).

Deliberate differences (see docs/methods/cpnet.md): a one-channel dataset drops the jitter's saturation and hue,
which need colour (kornia refuses them); the generator upsamples to each node's exact size (the authors'
integer factor ``size // prev_size``, identical where it divides, as on CIFAR); ``--dist`` is not a setting: the
authors' code stores it and never reads it.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import kornia.augmentation as K
import torch
import torch.nn as nn
import torch.nn.functional as F

from dfkd_bench.errors import DfkdError
from dfkd_bench.losses import BNStatsHook, kl_divergence
from dfkd_bench.method import SynthContext
from dfkd_bench.methods.nayer import NAYER, SHARED_BUDGET, NoisyLayerGenerator, NoisyLayerSettings
from dfkd_bench.presets import CPU_PROTOCOL, QUICK_PROTOCOL
from dfkd_bench.registry import SYNTHESIZERS, get_preset, register_preset
from dfkd_bench.zoo import SmallImageResNet, SmallImageVGG, WideResNet

SMOOTHING = 0.1  # the label smoothing the alignment's logit gap assumes (synthesis/cpnet.py:37)
PINV_FLOOR = 0.1  # singular values below it are raised to it before inverting (synthesis/cpnet.py:75)


# ---------------------------------------------------------------- the teacher's nodes

def coupled_nodes(teacher: nn.Module) -> list[nn.BatchNorm2d]:
    """The teacher BatchNorm layers the generator is coupled to, shallow to deep.

    The authors list them per architecture (``datafree/models/generator.py:8-13``: ``wrn40_2``, ``resnet34``,
    ``vgg11``); the same rule applies here to every zoo model of that family. Raises :class:`DfkdError` for
    other teachers.
    """
    if isinstance(teacher, WideResNet):  # bn1 of each group's first block, then the final BN
        return [group[0].bn1 for group in (teacher.block1, teacher.block2, teacher.block3)] + [teacher.bn_final]
    if isinstance(teacher, SmallImageResNet):  # layer{1..4}.<last>.bn2
        return [layer[-1].bn2 for layer in (teacher.layer1, teacher.layer2, teacher.layer3, teacher.layer4)]
    if isinstance(teacher, SmallImageVGG):  # block{0,1,2,4}'s last BN: stages 1, 2, 3 and the last
        stages: list[list[nn.BatchNorm2d]] = [[]]
        for m in teacher.features:
            if isinstance(m, nn.MaxPool2d):
                stages.append([])
            elif isinstance(m, nn.BatchNorm2d):
                stages[-1].append(m)
        if len(stages) < 4:
            raise DfkdError(f"cpnet: a VGG teacher needs at least 4 stages, this one has {len(stages)}")
        return [stages[0][-1], stages[1][-1], stages[2][-1], stages[-1][-1]]
    raise DfkdError(f"cpnet couples its generator to a WRN, ResNet or VGG teacher of the zoo (the authors' "
                    f"wrn40_2, resnet34, vgg11); got {type(teacher).__name__}")


def node_shapes(teacher: nn.Module, nodes: list[nn.BatchNorm2d], image_shape: tuple[int, int, int]
                ) -> list[tuple[int, int, int]]:
    """(C, H, W) of each node's input, measured on one zero image (the authors' ``get_cfg`` pass)."""
    shapes: dict[int, tuple[int, int, int]] = {}
    handles = [m.register_forward_hook(lambda m, i, o, k=k: shapes.__setitem__(k, tuple(i[0].shape[1:])))
               for k, m in enumerate(nodes)]
    p = next(teacher.parameters())
    try:
        with torch.no_grad():
            teacher(torch.zeros(1, *image_shape, device=p.device, dtype=p.dtype))
    finally:
        for h in handles:
            h.remove()
    return [shapes[k] for k in range(len(nodes))]


class CoupledBody(nn.Module):
    """The teacher read backwards: ``(B, in_features)`` -> images ``(B, C, H, W)`` in [0, 1].

    A linear map to the deepest node's shape, BatchNorm, then one block per node from deep to shallow:
    upsample to the next node's size (nearest), 3x3 conv to its channels, BatchNorm, LeakyReLU(0.2); the last
    block goes to the image (conv with bias, sigmoid). ``forward`` returns the image and each block's input,
    shallow to deep: those maps have the nodes' shapes (``CoupledGenerator``, generator.py:285-355).
    """

    def __init__(self, in_features: int, shapes: list[tuple[int, int, int]], image_shape: tuple[int, int, int]):
        super().__init__()
        deep = list(reversed(shapes))  # deepest first, as the generator runs
        c0, h0, w0 = deep[0]
        self.start = (c0, h0, w0)
        self.project = nn.Linear(in_features, c0 * h0 * w0)
        self.norm = nn.BatchNorm2d(c0)
        blocks = []
        targets = deep[1:] + [image_shape]
        for i, ((cin, _, _), (cout, h, w)) in enumerate(zip(deep, targets)):
            last = i == len(deep) - 1
            blocks.append(nn.Sequential(
                nn.Upsample(size=(h, w)),  # the authors' integer factor where it divides (the same map)
                nn.Conv2d(cin, cout, 3, 1, 1, bias=last),
                nn.Identity() if last else nn.BatchNorm2d(cout),
                nn.Sigmoid() if last else nn.LeakyReLU(0.2, inplace=True),
            ))
        self.blocks = nn.ModuleList(blocks)

    def forward(self, v: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        x = self.norm(self.project(v).view(len(v), *self.start))
        inputs = []
        for block in self.blocks:
            inputs.append(x)
            x = block(x)
        return x, inputs[::-1]


class NodeTargets:
    """Forward hooks on the coupled nodes: after a teacher pass, ``targets[k]`` is node k's input standardized
    by its batch statistics (unbiased variance) and rescaled to the node's running statistics, detached. When the
    node's BN-statistics hook has a moving average, the batch statistics are blended with it at the same momentum
    (``apply_cp_reverse_norm``, hooks.py:139-152)."""

    def __init__(self, nodes: list[nn.BatchNorm2d], stats: list[BNStatsHook], momentum: float):
        self.stats, self.momentum = stats, momentum
        self.targets: list[torch.Tensor | None] = [None] * len(nodes)
        self.active = False
        self.handles = [m.register_forward_hook(self._hook(k)) for k, m in enumerate(nodes)]

    def _hook(self, k: int):
        def hook(module: nn.BatchNorm2d, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
            if not self.active:
                return
            with torch.no_grad():
                x = inputs[0].float()
                var, mean = torch.var_mean(x, dim=(0, 2, 3), unbiased=True)
                ema = self.stats[k].ema
                if ema is not None:
                    mean = (1 - self.momentum) * mean + self.momentum * ema[0]
                    var = (1 - self.momentum) * var + self.momentum * ema[1]
                z = (x - mean.view(1, -1, 1, 1)) / var.sqrt().view(1, -1, 1, 1)
                self.targets[k] = (z * module.running_var.float().sqrt().view(1, -1, 1, 1)
                                   + module.running_mean.float().view(1, -1, 1, 1))
        return hook

    def clear(self) -> None:
        self.targets = [None] * len(self.targets)

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def clamped_pinv(matrix: torch.Tensor, floor: float = PINV_FLOOR) -> torch.Tensor:
    """Pseudo-inverse of ``matrix`` (m, n) -> (n, m) with its singular values raised to at least ``floor``
    (``compute_pinv``, synthesis/cpnet.py:267-274)."""
    u, s, vh = torch.linalg.svd(matrix.double(), full_matrices=False)
    return (vh.T @ torch.diag(1.0 / s.clamp_min(floor)) @ u.T).to(matrix.dtype)


def alignment_loss(features: torch.Tensor, onehot: torch.Tensor, pinv: torch.Tensor, bias: torch.Tensor
                   ) -> torch.Tensor:
    """CPNet's feature alignment (``compute_dis``, synthesis/cpnet.py:257-264): the mean over the batch of
    ``|cos(f - (y * delta - b) P, 1 P)|``.

    Args:
        features: the teacher's pooled features ``(B, D)``.
        onehot: the targets as one-hot rows ``(B, K)``.
        pinv: ``(K, D)``, :func:`clamped_pinv` of the classifier weight transposed.
        bias: the classifier's bias ``(K,)`` (zeros when it has none).
    """
    k = onehot.shape[1]
    delta = math.log((1 - SMOOTHING) * (k - 1) / SMOOTHING)
    a = features - (onehot * delta - bias) @ pinv
    b = torch.ones_like(onehot) @ pinv
    return F.cosine_similarity(a, b, dim=1).abs().mean()


def reverse_adversarial_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """CPNet's competition term: ``-KL(p_s || p_t)`` averaged over the batch, counting only the samples where
    student and teacher agree (``kldiv(t_out, s_out)``, synthesis/cpnet.py:171-172). NAYER's
    :func:`~dfkd_bench.losses.adversarial_loss` has the KL the other way round."""
    agree = (student_logits.argmax(1) == teacher_logits.argmax(1)).float()
    return -(kl_divergence(teacher_logits, student_logits, 1.0, reduction="none") * agree).mean()


def mixed_cross_entropy(logits: torch.Tensor, mix: torch.Tensor) -> torch.Tensor:
    """Cross-entropy against CutMix's labels: ``mix`` is ``(B, 3)`` rows (label a, label b, share of b)."""
    ce_a = F.cross_entropy(logits, mix[:, 0].long(), reduction="none")
    ce_b = F.cross_entropy(logits, mix[:, 1].long(), reduction="none")
    return ((1 - mix[:, 2]) * ce_a + mix[:, 2] * ce_b).mean()


def color_jitter(channels: int) -> nn.Module:
    """ColorJitter(0.1, 0.1, 0.1, 0.1, p=0.4) (synthesis/cpnet.py:86); saturation and hue need colour, so a
    one-channel image gets brightness and contrast only."""
    colour = channels == 3
    return K.ColorJitter(0.1, 0.1, 0.1 if colour else 0.0, 0.1 if colour else 0.0, p=0.4)


def cutmix() -> nn.Module:
    """kornia's CutMix as the authors call it (p=0.5, labels returned as (a, b, share) rows)."""
    with warnings.catch_warnings():  # kornia announces a future change of its lambda; the authors ran this one
        warnings.simplefilter("ignore", DeprecationWarning)
        return K.RandomCutMixV2(p=0.5, data_keys=["input", "class"])


# ---------------------------------------------------------------- the method

@SYNTHESIZERS.register
class CPNet(NAYER):
    name = "cpnet"
    summary = "NAYER with a generator shaped as the teacher backwards, its features coupled to the teacher's"

    @dataclass
    class Config(NoisyLayerSettings):
        """NAYER's settings (CPNet's datafree_kd.py keeps NAYER's arguments; cpnet_100.sh sets the same values)."""

        cutmix: bool = True  # synthesize(use_cutmix=True), synthesis/cpnet.py:90

    def __init__(self, ctx: SynthContext, cfg: Config):
        nodes = coupled_nodes(ctx.teacher)
        self._shapes = node_shapes(ctx.teacher, nodes, ctx.image_shape)
        super().__init__(ctx, cfg)
        by_module = {id(h.module): h for h in self.bn_stats.hooks}
        self.node_targets = NodeTargets(nodes, [by_module[id(m)] for m in nodes], cfg.bn_momentum)
        classifier = ctx.teacher.get_classifier()
        weight = classifier.weight.detach().float()
        bias = classifier.bias.detach().float() if classifier.bias is not None else weight.new_zeros(len(weight))
        self.register_buffer("pinv", clamped_pinv(weight.T), persistent=False)
        self.register_buffer("fc_bias", bias.clone(), persistent=False)
        self.jitter = color_jitter(ctx.image_shape[0])
        self.mix = cutmix() if cfg.cutmix else None

    def build_generator(self, embeddings: torch.Tensor) -> NoisyLayerGenerator:
        body = CoupledBody(self.cfg.le_emb_size, self._shapes, self.ctx.image_shape)
        c, h, _ = self.ctx.image_shape
        return NoisyLayerGenerator(embeddings, self.cfg.le_emb_size, 0, h, c, self.ctx.synth_batch_size, body=body)

    def _synthesize(self):
        self.node_targets.active = True
        try:
            return super()._synthesize()
        finally:
            self.node_targets.active = False
            self.node_targets.clear()

    def _forward(self, targets: torch.Tensor, adversarial: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """One step (synthesis/cpnet.py:146-178): bn * L_BN + oh * CE(CutMix) + adv * (L_adv + L_align) + L_couple."""
        cfg, ctx = self.cfg, self.ctx
        x_unit, features = self.generator(targets)
        x = ctx.normalizer(self.jitter(self.augment(x_unit)))
        mix = None
        if self.mix is not None:
            x, mixes = self.mix(x, targets)
            mix = mixes[0]
        teacher = ctx.teacher
        with ctx.autocast():
            pooled = teacher.forward_head(teacher.forward_features(x), pre_logits=True)
            t = teacher.get_classifier()(pooled).float()
            s = ctx.student(x).float() if adversarial else None
        ce = mixed_cross_entropy(t, mix) if mix is not None else F.cross_entropy(t, targets)
        couple = sum(F.mse_loss(f, target) for f, target in zip(features, self.node_targets.targets))
        terms = {"bn": cfg.bn * self.bn_stats.loss(), "ce": cfg.oh * ce, "couple": couple}
        if adversarial:
            terms["adv"] = cfg.adv * reverse_adversarial_loss(s, t)
            onehot = F.one_hot(targets, ctx.num_classes).float()
            terms["align"] = cfg.adv * alignment_loss(pooled.float(), onehot, self.pinv, self.fc_bias)
        return x_unit, terms


# Published settings: cpnet_100.sh:43-46 (CIFAR-10 WRN-40-2 -> WRN-16-1; cpnet_300.sh: 320 epochs) passes NAYER's
# nayer_100.sh values flag for flag, and its datafree_kd.py keeps NAYER's defaults (ep_steps = kd_steps 400, wd 1e-4,
# eta_min 2e-4, T 20, bn_mmt 0.9): NAYER's paper preset. Tiny-ImageNet ResNet-34 -> ResNet-18, cpnet_100.sh:68-72:
# NAYER's (nayer_100.sh:68-73) except lr 0.2 where NAYER's script has 0.1.
register_preset("cpnet", "paper", get_preset("nayer", "paper"))
register_preset("cpnet", "paper-tiny-imagenet", {**get_preset("nayer", "paper-tiny-imagenet"), "lr": 0.2})
# The shared budgets, exactly as NAYER's (one loop per round, no warm-up, one-hot embeddings)
register_preset("cpnet", "quick", {**QUICK_PROTOCOL, **SHARED_BUDGET, "method.g_steps": 20, "method.g_life": 5})
register_preset("cpnet", "cpu", {**CPU_PROTOCOL, **SHARED_BUDGET, "method.g_steps": 30, "method.g_life": 10})
