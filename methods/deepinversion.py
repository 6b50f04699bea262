"""DeepInversion (Yin et al., CVPR 2020): optimize the pixels of a batch directly so the
teacher's BatchNorm statistics, its confidence on random targets and an image prior agree.

Details follow the implementation in the CMI / Fast-Datafree ``datafree`` package
(datafree/synthesis/deepinversion.py; docs/methods/deepinversion.md): its adversarial term is
minus a clamped Jensen-Shannon-style divergence at temperature 3, and it returns the batch's
final iterate: its "best batch" is an alias of the tensor being optimized, so it always equals
the last step. Keeping the truly best batch is an option (``keep_best``), off by default.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from dfkd_bench.inversion import invert
from dfkd_bench.losses import BNStatistics, adversarial_loss, clamped_js_divergence, total_variation
from dfkd_bench.method import SynthBatch, Synthesizer
from dfkd_bench.presets import CPU_PROTOCOL, QUICK_PROTOCOL
from dfkd_bench.registry import SYNTHESIZERS, register_preset
from dfkd_bench.settings import MethodSettings, at_least, choice


@SYNTHESIZERS.register
class DeepInversion(Synthesizer):
    name = "deepinversion"
    summary = ("Adam on the pixels: BN statistics + CE + TV + adversarial, jitter and flip; the last iterate "
               "(keep_best: the lowest-loss batch)")

    @dataclass
    class Config(MethodSettings):
        # Adam iterations per batch (the package's scripts; the Fast paper's DeepInv-2k: 2000)
        g_steps: int = at_least(1, default=1000)
        lr_g: float = 0.1
        beta1: float = 0.5
        beta2: float = 0.99
        bn: float = 10.0  # BN-statistics weight
        oh: float = 1.0  # one-hot cross entropy weight
        adv: float = 1.0  # adversarial weight
        adv_T: float = 3.0  # the adversarial divergence's temperature
        tv: float = 1e-3  # total variation weight (CMI's datafree_kd.py; Fast-Datafree's passes 0)
        l2: float = 0.0  # weight of the whole batch's pixel L2 norm
        adv_mode: str = choice("js", "masked")  # the package's JS form, or CMI/Fast's masked KL
        jitter: float = 0.125  # max roll as a fraction of H and W
        flip: bool = True
        keep_best: bool = False  # return the lowest-loss batch (a fix; the package returns the last iterate)

    def __init__(self, ctx, cfg: Config):
        super().__init__(ctx, cfg)
        self.bn_stats = BNStatistics(ctx.teacher, active=False)  # on during synthesis only
        norm = ctx.normalizer
        # the valid range of normalized pixels, per channel
        self.register_buffer("lo", norm(torch.zeros(1, ctx.image_shape[0], 1, 1, device=ctx.device)), False)
        self.register_buffer("hi", norm(torch.ones(1, ctx.image_shape[0], 1, 1, device=ctx.device)), False)

    def _loss_terms(self, x: torch.Tensor, view: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        """The loss of the jittered ``view`` of the batch ``x`` (the image priors look at ``x`` itself)."""
        cfg = self.cfg
        t, s = self.teacher_student(view)
        terms = {"bn": cfg.bn * self.bn_stats.loss(), "ce": cfg.oh * F.cross_entropy(t, y)}
        if cfg.adv > 0:
            adv = adversarial_loss(s, t) if cfg.adv_mode == "masked" else -clamped_js_divergence(s, t, cfg.adv_T)
            terms["adv"] = cfg.adv * adv
        if cfg.tv > 0:
            terms["tv"] = cfg.tv * total_variation(x)
        if cfg.l2 > 0:
            terms["l2"] = cfg.l2 * x.norm()
        return terms

    def synthesize(self) -> SynthBatch:
        with self.bn_stats.recording():
            return self._synthesize()

    def _synthesize(self) -> SynthBatch:
        cfg, ctx = self.cfg, self.ctx
        n = ctx.synth_batch_size
        _, h, w = ctx.image_shape
        x = torch.randn(n, *ctx.image_shape, device=ctx.device, requires_grad=True)
        y = torch.randint(ctx.num_classes, (n,), device=ctx.device)
        opt = torch.optim.Adam([x], lr=cfg.lr_g, betas=(cfg.beta1, cfg.beta2))
        max_dx, max_dy = int(w * cfg.jitter), int(h * cfg.jitter)

        def forward() -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
            dx = int(torch.randint(-max_dx, max_dx + 1, ()).item()) if max_dx else 0
            dy = int(torch.randint(-max_dy, max_dy + 1, ()).item()) if max_dy else 0
            view = torch.roll(x, shifts=(dy, dx), dims=(2, 3))
            if cfg.flip and torch.rand(()) < 0.5:
                view = view.flip(3)
            return x, self._loss_terms(x, view, y)

        @torch.no_grad()
        def clamp() -> None:  # keep every pixel inside the range the normalization maps [0, 1] to
            x.copy_(torch.maximum(torch.minimum(x, self.hi), self.lo))

        # the last iterate is x itself after its last update (Inversion.last_images aliases it)
        run = invert(opt, cfg.g_steps, forward, keep_best=cfg.keep_best, after_step=clamp)
        images = ctx.normalizer.inverse(run.kept).clamp(0, 1)
        return SynthBatch(images, y, {**run.last_terms, "total": run.curve[-1]}, run.curve,
                          teacher_passes=n * cfg.g_steps)


# Published: CIFAR-10, WRN-40-2 -> WRN-16-1, the package's scripts/deepinv (83.04% in CMI's README):
# 200 epochs of one round of 400 student steps, batch 256 = synthesis batch, g_steps 1000.
register_preset("deepinversion", "paper", {
    "epochs": 200, "ep_steps": 400, "kd_steps": 400, "batch_size": 256, "synth_batch_size": 256,
    "lr": 0.1, "weight_decay": 1e-4, "temperature": 20.0, "method.g_steps": 1000,
})
register_preset("deepinversion", "quick", {**QUICK_PROTOCOL, "method.g_steps": 50})
register_preset("deepinversion", "cpu", {**CPU_PROTOCOL, "method.g_steps": 50})
