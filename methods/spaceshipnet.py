"""SpaceshipNet: data-free KD via channel-wise feature exchange (CFE) and a multi-scale spatial activation
region consistency constraint (mSARC) (Yu, Chen, Han, Jiang, CVPR 2023).

Reference: the authors' code (github.com/skgyu/SpaceshipNet, ``code/SpaceshipNet``). ``V37`` below is
``models/model_CFE_mSARC_bases/model_CFE_mSARC_base_V37.py``, the model their CIFAR and Tiny-ImageNet
configs load; ``C100`` is ``scripts/DFKD_Cifar100_ResNet34_ResNet18_V37_conv012_seed40.yaml``.

One epoch = one synthesis round, then the student's steps (``optimize_step``, V37:850-867):

- Synthesis (``train_G``, V37:463-612). One generator (the CMI generator, C100:95-102) lives for the whole
  run: it is never re-initialized, only given the authors' Kaiming initialization once (C100:101,
  ``networks/init.py:26-47``). Each round draws a fixed latent batch z (V37:474; not optimized: Adam
  steps the generator alone, lr 1e-3, betas (0.5, 0.999), a new Adam every round, V37:485) and
  class-balanced targets ``y = i mod K`` (V37:478 -> ``model_CFE_mSARC_base.py:247``), and takes
  ``g_steps`` steps on ``0.5 * CE(T(aug(G(z))), y) + 1 * L_BN`` (V37:509-557; aug = crop with 4 pixels of
  padding + flip, V37:197-200; no adversarial, no contrastive term). The lowest-loss step (V37:562-569)
  gives the round's output: not its images but the generator's three intermediate feature maps for
  them (after the first BN, after the first and the second upsampling conv blocks:
  ``networks/cmi_generator.py:51-61``), appended to three ever-growing feature pools (V37:584-586).
- Student batches (``train_S``, V37:652-751). Every step picks a level uniformly from ``levels``
  (V37:667), takes the next batch of that level's shuffled pass over its pool (V37:590-610, 669-677),
  with probability ``cfe_p`` exchanges channels between the batch's samples (CFE: sample i keeps a random
  half of its channels and takes the others from sample n-1-i, V37:617-648, 699-702) and decodes the
  features into images with the rest of the *current* generator in eval mode
  (``cmi_generator.py:63-84``, V37:707/747, 865). Then the usual crop + flip (V37:751).
- Student loss (V37:770-836), the registered ``spaceshipnet`` loss: the KL of PyTorch's default
  ``KLDivLoss`` (mean over batch *and* classes) times ``alpha * T^2`` (V37:780-793), plus mSARC: the MSE
  between student and teacher class activation maps (the last feature map through the classifier's
  weights, all classes, V37:801-808) and the summed MSE between their Grad-CAM maps at every stage for the
  teacher's top class (V37:817-828, ``gradcam_cope`` V37:29-43; no ReLU, the gradient weights are
  constants).
- The student: SGD lr 0.1, momentum 0.9, weight decay 1e-4, cosine over the 200 epochs
  (``model_CFE_mSARC_base.py:98``, ``options/train_options.py:15``, ``networks/scheduler.py:61-63``).

Everything the student learns from is decoded from the feature pools, so the runner's image pool stays
empty: ``batch_source = "fresh"``, and ``sample`` makes each student batch. The pools are kept here, in
float32 on the CPU, as the authors keep theirs (LMDB of float32 arrays); they are checkpointed with the
method. docs/methods/spaceshipnet.md lists the authors' code line by line and the oddities found in it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from dfkd_bench.errors import DfkdError
from dfkd_bench.generative import GeneratorConfig, GeneratorSynthesizer
from dfkd_bench.generator import Generator
from dfkd_bench.losses import kl_divergence
from dfkd_bench.method import DistillLoss, LossContext, Outputs, SynthBatch, SynthContext
from dfkd_bench.pool import PassSampler
from dfkd_bench.presets import CPU_PROTOCOL, QUICK_PROTOCOL
from dfkd_bench.registry import LOSSES, SYNTHESIZERS, register_preset
from dfkd_bench.settings import LossSettings, at_least
from dfkd_bench.zoo import stage_modules

# The authors' three feature levels (their conv_idx 0, 1, 2: layer1_out, conv1_out, conv2_out) in our
# Generator's ``body`` (dfkd_bench/generator.py): the output of body[0] (the BN after the projection),
# body[4] (conv-BN-LeakyReLU after the first upsampling) and body[8] (the same after the second). A level's
# features are decoded by the layers after its index.
LEVEL_ENDS = (0, 4, 8)


def kaiming_init_(module: nn.Module) -> None:
    """The authors' ``weights_init('kaiming')`` (``networks/init.py:26-47``): conv and linear weights
    ``kaiming_normal_(a=0, mode='fan_in')``, biases zero, BatchNorm weights N(1, 0.02), BN biases zero."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
            nn.init.kaiming_normal_(m.weight, a=0, mode="fan_in")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.normal_(m.weight, 1.0, 0.02)
            nn.init.zeros_(m.bias)


def balanced_labels(n: int, num_classes: int, device: torch.device | None = None) -> torch.Tensor:
    """Targets ``0, 1, ..., K-1, 0, 1, ...``: the authors' ``generate_input(test=True)``."""
    return torch.arange(n, device=device) % num_classes


def channel_exchange(features: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """CFE on a batch of feature maps ``(n, C, h, w)``: sample i keeps ``C // 2`` of its channels, drawn
    without replacement for each sample on its own, and takes the other channels from sample ``n-1-i``
    (the batch reversed). The masks come from ``generator`` on the CPU."""
    n, c = features.shape[:2]
    picks = torch.rand(n, c, generator=generator).argsort(dim=1)[:, :c // 2]
    keep = torch.zeros(n, c, dtype=torch.bool).scatter_(1, picks, True).to(features.device)
    return torch.where(keep[:, :, None, None], features, features.flip(0))


def decode(generator: Generator, features: torch.Tensor, level: int) -> torch.Tensor:
    """Images in [0, 1] from feature maps of ``level``: the generator's layers after that level, as its
    own forward pass runs them (the authors' ``generate_using_convout``)."""
    x = generator.body[LEVEL_ENDS[level] + 1:](features)
    if x.shape[-1] != generator.image_size:
        x = F.interpolate(x, size=(generator.image_size, generator.image_size), mode="bilinear",
                          align_corners=False)
    return torch.sigmoid(x)


class FeatureLevel:
    """One level's pool: every round's feature maps, one CPU chunk per round, gathered by index
    (what :class:`~dfkd_bench.pool.PassSampler` draws passes over)."""

    def __init__(self) -> None:
        self.chunks: list[torch.Tensor] = []
        self._offsets = torch.zeros(1, dtype=torch.long)

    def __len__(self) -> int:
        return int(self._offsets[-1])

    def add(self, features: torch.Tensor) -> None:
        self.chunks.append(features.detach().float().cpu().contiguous())
        self._offsets = torch.cat([self._offsets, self._offsets[-1:] + len(features)])

    def gather(self, idx: torch.Tensor) -> tuple[torch.Tensor, None]:
        chunk = torch.searchsorted(self._offsets, idx, right=True) - 1
        out = torch.empty((len(idx), *self.chunks[0].shape[1:]))
        for c in chunk.unique().tolist():
            sel = (chunk == c).nonzero().flatten()
            out[sel] = self.chunks[c][idx[sel] - self._offsets[c]]
        return out, None

    def set_chunks(self, chunks: list[torch.Tensor]) -> None:
        self.__init__()
        for features in chunks:
            self.add(features)


@SYNTHESIZERS.register
class SpaceshipNet(GeneratorSynthesizer):
    name = "spaceshipnet"
    summary = ("persistent generator (BN + CE); student batches decoded from pooled generator features "
               "with channel exchange; student: KL + CAM/Grad-CAM map matching")
    default_loss = "spaceshipnet"
    batch_source = "fresh"  # every student batch is decoded anew from the feature pools (sample)

    @dataclass
    class Config(GeneratorConfig):
        g_steps: int = at_least(1, default=200)  # C100:36
        lr_g: float = 1e-3  # C100:40 (optimizer_G.lr)
        lr_z: float = 0.0  # V37:485: Adam over the generator only; z is drawn once per round and kept
        beta1: float = 0.5  # V37:485
        beta2: float = 0.999  # V37:485
        nz: int = at_least(1, default=256)  # C100:102 (generator.input_dim)
        ngf: int = at_least(1, default=64)  # C100:97
        bn: float = 1.0  # lambda_bn_meanvar, C100:58 (first_bn_multiplier 1, C100:59)
        oh: float = 0.5  # lambda_cls, C100:57
        adv: float = 0.0  # V37:557: the generator loss has no adversarial term
        bn_momentum: float = 0.0  # V37:544-548: plain running statistics, no moving average
        reset_generator: bool = False  # V37 never re-initializes G (its reset_model is never called)
        cfe_p: float = 0.7  # gen_mixup_cutmix_p, C100:71 (use_gen_mixup_cutmix True, C100:70); 0: no CFE
        levels: tuple[int, ...] = (0, 1, 2)  # conv_idx, C100:75: the feature levels student batches come from

        def check(self) -> None:
            if self.cfe_p > 1:
                raise DfkdError(f"{self.key('cfe_p')} is a probability, got {self.cfe_p}")
            levels = tuple(self.levels)
            if not levels or any(level not in range(len(LEVEL_ENDS)) for level in levels):
                raise DfkdError(f"{self.key('levels')} must be one or more of 0, 1, 2, "
                                f"got {','.join(map(str, levels)) or 'nothing'}")

    def __init__(self, ctx: SynthContext, cfg: Config):
        super().__init__(ctx, cfg)
        kaiming_init_(self.generator)  # C100:101 (generator.init: kaiming), once: the generator is never reset
        self.pools = [FeatureLevel() for _ in LEVEL_ENDS]
        # the student batches' randomness (level, pass order, CFE coin and masks), checkpointed with the method
        self.sample_rng = torch.Generator().manual_seed(int(torch.randint(2**62, ())))
        self.passes = [PassSampler(self.sample_rng) for _ in LEVEL_ENDS]
        self._recording = False
        self._step_features: list[torch.Tensor] = []
        self._best_features: list[torch.Tensor] = []
        for level, index in enumerate(LEVEL_ENDS):
            self.generator.body[index].register_forward_hook(self._feature_hook(level))

    def _feature_hook(self, level: int):
        def keep(module: nn.Module, inputs: Any, output: torch.Tensor) -> None:
            if self._recording:
                self._step_features[level] = output
        return keep

    def on_best_step(self) -> None:
        # the step's features, before its update changes the generator (V37:562-569)
        self._best_features = [f.detach().clone() for f in self._step_features]

    # ---------------------------------------------------------------- synthesis

    def round_targets(self, n: int) -> torch.Tensor:
        return balanced_labels(n, self.ctx.num_classes, self.ctx.device)  # y = i mod K (V37:478, base:247)

    def _synthesize(self) -> SynthBatch:
        """The shared generator loop (``GeneratorSynthesizer._synthesize``: with this method's class-balanced
        targets, and z out of the optimizer at ``lr_z`` 0), recording the generator's feature maps; the best
        step's features go to the pools instead of its images to the runner."""
        self._recording, self._step_features = True, [None] * len(LEVEL_ENDS)
        try:
            batch = super()._synthesize()
        finally:
            self._recording, self._step_features = False, []
        for pool, features in zip(self.pools, self._best_features):
            pool.add(features)
        self._best_features = []
        for passes in self.passes:  # a new shuffled pass over the grown pools (V37:590-610)
            passes.restart()
        # the student's images are decoded in `sample`; nothing goes to the runner's pool
        return dataclasses.replace(batch, images=batch.images.new_empty(0, *self.ctx.image_shape), labels=None)

    # ---------------------------------------------------------------- student batches

    @torch.no_grad()
    def sample(self, n: int) -> SynthBatch:
        """One student batch: a level, the next batch of its pass, CFE with probability ``cfe_p``, decoded by
        the current generator in eval mode (V37:667-751)."""
        if not len(self.pools[0]):
            raise DfkdError("spaceshipnet draws student batches from its feature pools, which are empty: "
                            "no synthesis round has run")
        rng, levels = self.sample_rng, tuple(self.cfg.levels)
        level = levels[int(torch.randint(len(levels), (1,), generator=rng))]
        features, _ = self.passes[level].next_batch(self.pools[level], n)
        features = features.to(self.ctx.device)
        if self.cfg.cfe_p > 0 and float(torch.rand((), generator=rng)) < self.cfg.cfe_p:
            features = channel_exchange(features, rng)
        self.generator.eval()
        return SynthBatch(decode(self.generator, features, level))

    @torch.no_grad()
    def draw(self, n: int) -> torch.Tensor:
        """``n`` new images from the current generator (eval mode, new latents), none of them pooled: the
        held-out images of the data-free checkpoint rule (selection.py)."""
        self.generator.eval()
        return self.generator(torch.randn(n, self.cfg.nz, device=self.ctx.device))

    # ---------------------------------------------------------------- checkpoints

    def get_extra_state(self) -> dict[str, Any]:
        return {**super().get_extra_state(), "pools": [pool.chunks for pool in self.pools],
                "sample_rng": self.sample_rng.get_state()}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        super().set_extra_state(state)
        for pool, chunks in zip(self.pools, state["pools"]):
            pool.set_chunks(chunks)
        self.sample_rng.set_state(state["sample_rng"])


# ---------------------------------------------------------------- the student's loss


def class_activation_maps(features: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """CAMs of every class ``(B, K, h, w)``: the feature map ``(B, C, h, w)`` through the classifier's weight
    ``(K, C)`` as a 1x1 convolution without bias (the authors' ``fc_like_conv``, V37:62-83)."""
    return torch.einsum("bchw,kc->bkhw", features.float(), weight.float())


def grad_cams(logits: torch.Tensor, maps: list[torch.Tensor], target: torch.Tensor,
              retain_graph: bool) -> list[torch.Tensor]:
    """Grad-CAM of class ``target`` at each feature map ``(B, C, h, w)``: the channels summed, each weighted
    by the spatial mean of the target logit's gradient there; no ReLU (V37:29-43). The weights are constants
    (no graph through the gradient); the maps keep theirs. Returns ``(B, h, w)`` maps."""
    score = logits.float().gather(1, target[:, None]).sum()
    grads = torch.autograd.grad(score, maps, retain_graph=retain_graph)
    return [(g.float().mean(dim=(2, 3), keepdim=True) * m.float()).sum(1) for g, m in zip(grads, maps)]


def map_mse(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """MSE of two maps ``(..., h, w)``. The authors' pairs have equal sizes; for networks whose sizes differ,
    the larger map is average-pooled to the smaller one's size first."""
    size = (min(student.shape[-2], teacher.shape[-2]), min(student.shape[-1], teacher.shape[-1]))

    def fit(m: torch.Tensor) -> torch.Tensor:
        if tuple(m.shape[-2:]) == size:
            return m
        if m.dim() == 3:  # Grad-CAMs (B, h, w)
            return F.adaptive_avg_pool2d(m.unsqueeze(1), size).squeeze(1)
        return F.adaptive_avg_pool2d(m, size)

    return F.mse_loss(fit(student.float()), fit(teacher.float()))


class StageMaps:
    """Forward hooks on ``zoo.stage_modules(model)`` keeping the stage outputs of the latest pass that ran with
    gradients enabled (and while ``recording``)."""

    def __init__(self, model: nn.Module, recording: bool = True):
        modules = stage_modules(model)
        self.maps: list[torch.Tensor | None] = [None] * len(modules)
        self.recording = recording
        for i, m in enumerate(modules):
            m.register_forward_hook(self._keeper(i))

    def _keeper(self, i: int):
        def keep(module: nn.Module, inputs: Any, output: torch.Tensor) -> None:
            if self.recording and torch.is_grad_enabled():
                self.maps[i] = output
        return keep

    def clear(self) -> None:
        self.maps = [None] * len(self.maps)


class InputCatcher:
    """Keeps the batch a model's ``forward_features`` last ran on with gradients enabled. The runner calls
    ``forward_features`` itself, so a hook on the model never fires; one probe pass finds the first submodule
    that receives the input tensor as it is (the stem), and a pre-hook there keeps it."""

    def __init__(self, model: nn.Module, shape: tuple[int, int, int]):
        self.x: torch.Tensor | None = None
        probe_hit: list[nn.Module] = []
        p = next(model.parameters())
        probe = torch.zeros(2, *shape, device=p.device, dtype=p.dtype)

        def find(module: nn.Module, inputs: Any) -> None:
            if not probe_hit and inputs and inputs[0] is probe:
                probe_hit.append(module)

        handles = [m.register_forward_pre_hook(find) for m in model.modules() if m is not model]
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                model.forward_features(probe)
        finally:
            model.train(was_training)
            for h in handles:
                h.remove()
        if not probe_hit:
            raise DfkdError(f"{type(model).__name__}: no submodule takes the input as it is, so the spaceshipnet "
                            "loss cannot re-run the teacher for its Grad-CAM maps; use --set loss.gradcam=0")
        probe_hit[0].register_forward_pre_hook(self._keep)

    def _keep(self, module: nn.Module, inputs: Any) -> None:
        if torch.is_grad_enabled():
            self.x = inputs[0].detach()


@LOSSES.register
class SpaceshipNetLoss(DistillLoss):
    name = "spaceshipnet"
    summary = ("alpha * T^2 * KL averaged over batch and classes + cam * MSE(CAMs) + gradcam * sum over stages "
               "of MSE(Grad-CAMs of the teacher's class)")

    @dataclass
    class Config(LossSettings):
        kd: float = 1.0  # distill.alpha, C100:89: the KL's weight (its T^2 and 1/K are the authors', V37:787-793)
        cam: float = 1.0  # lambda_mSARC_cam_mse, C100:60
        gradcam: float = 1.0  # lambda_mSARC_gradcams_mse, C100:61 (per stage, summed)

    def __init__(self, ctx: LossContext, cfg: Config):
        super().__init__(ctx, cfg)
        c, h, w = ctx.image_shape
        if cfg.cam > 0:
            self._check_classifier(ctx.teacher, "teacher", (c, h, w))
            self._check_classifier(ctx.student, "student", (c, h, w))
        if cfg.gradcam > 0:
            self._student_maps = StageMaps(ctx.student)
            self._teacher_maps = StageMaps(ctx.teacher, recording=False)  # only while the loss re-runs it
            self._student_input = InputCatcher(ctx.student, (c, h, w))

    @classmethod
    def compilable(cls, cfg: Config) -> bool:
        return cfg.gradcam == 0  # Grad-CAM differentiates the logits with respect to stage maps

    @staticmethod
    def _check_classifier(model: nn.Module, role: str, shape: tuple[int, int, int]) -> None:
        head = model.get_classifier() if hasattr(model, "get_classifier") else None
        p = next(model.parameters())
        was_training = model.training
        model.eval()
        with torch.no_grad():
            features = model.forward_features(torch.zeros(2, *shape, device=p.device, dtype=p.dtype))
        model.train(was_training)
        if not isinstance(head, nn.Linear) or features.dim() != 4 or head.in_features != features.shape[1]:
            raise DfkdError(f"the spaceshipnet loss's class activation maps need a {role} whose logits are a linear "
                            f"layer on its pooled last feature map ({type(model).__name__} is not); "
                            "use --set loss.cam=0")

    def forward(self, s: Outputs, t: Outputs, y: torch.Tensor | None) -> dict[str, torch.Tensor]:
        cfg, ctx = self.cfg, self.ctx
        # nn.KLDivLoss()'s default reduction averages over batch and classes: the batch mean over K (V37:792)
        terms = {"kd": cfg.kd * kl_divergence(s.logits, t.logits, ctx.temperature) / ctx.num_classes}
        if cfg.cam > 0:
            # the student's CAMs use a copy of its classifier's weight: no gradient reaches the classifier (V37:76-81)
            s_cam = class_activation_maps(s.features, ctx.student.get_classifier().weight.detach())
            t_cam = class_activation_maps(t.features, ctx.teacher.get_classifier().weight)
            terms["cam"] = cfg.cam * map_mse(s_cam, t_cam.detach())
        if cfg.gradcam > 0:
            terms["gradcam"] = cfg.gradcam * self._gradcam_term(s.logits, t.logits.argmax(1))
        return terms

    def _gradcam_term(self, s_logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Sum over paired stages of MSE(student's Grad-CAM, teacher's), both for the teacher's top class."""
        s_maps, x = self._student_maps.maps, self._student_input.x
        self._student_maps.clear()  # the maps hold the step's graph: the loss's backward is their last use
        self._student_input.x = None
        if any(m is None for m in s_maps) or x is None or len(x) != len(s_logits):
            raise DfkdError("the spaceshipnet loss found no student pass with gradients on this batch")
        s_cams = grad_cams(s_logits, s_maps, target, retain_graph=True)
        # The runner's teacher pass ran without gradients: run it again on the same batch, the input made a leaf
        # that needs a gradient so the (frozen) teacher's stage maps get one.
        teacher = self.ctx.teacher
        self._teacher_maps.recording = True
        try:
            with torch.enable_grad():
                x = x.requires_grad_(True)
                t_logits = teacher.forward_head(teacher.forward_features(x))
                t_maps = self._teacher_maps.maps
                t_cams = [cam.detach() for cam in grad_cams(t_logits, t_maps, target, retain_graph=False)]
        finally:
            self._teacher_maps.recording = False
            self._teacher_maps.clear()
        # stages paired from the deepest (the authors' networks pair one to one)
        return sum(map_mse(sc, tc) for sc, tc in zip(reversed(s_cams), reversed(t_cams)))


# Published: CIFAR-100, ResNet-34 -> ResNet-18 (C100; the CIFAR-10 config, scripts/DFKD_Cifar10_ResNet34_ResNet18_
# V37_conv012.yaml, has the same values): 200 epochs (max_epoch 199, C100:28, counted from 0) of one round and 2000
# student steps (g_steps 200, kd_steps 2000, C100:36-37), batch 256 for both (C100:50), SGD lr 0.1 (C100:44)
# with momentum 0.9 and weight decay 1e-4 (model_CFE_mSARC_base.py:98, train_options.py:15), cosine over the
# epochs (C100:45), T 30 (C100:90). The README's rerun: 77.15 +- 0.21 over six seeds (paper: 77.41).
register_preset("spaceshipnet", "paper", {
    "epochs": 200, "ep_steps": 2000, "kd_steps": 2000, "batch_size": 256, "synth_batch_size": 256,
    "lr": 0.1, "momentum": 0.9, "weight_decay": 1e-4, "temperature": 30.0,
    "method.g_steps": 200, "method.lr_g": 1e-3, "method.oh": 0.5, "method.bn": 1.0, "method.cfe_p": 0.7,
    "loss.kd": 1.0, "loss.cam": 1.0, "loss.gradcam": 1.0,
})
# The shared budgets (CMI's quick/cpu g_steps); the temperature is the method's own (C100:90).
register_preset("spaceshipnet", "quick", {**QUICK_PROTOCOL, "temperature": 30.0, "method.g_steps": 20})
register_preset("spaceshipnet", "cpu", {**CPU_PROTOCOL, "temperature": 30.0, "method.g_steps": 30})
