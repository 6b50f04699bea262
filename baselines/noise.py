"""KD on noise: the lower bound. Each round adds random images the teacher labels by its outputs."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dfkd_bench.method import SynthBatch, Synthesizer
from dfkd_bench.presets import CPU_PROTOCOL, QUICK_PROTOCOL
from dfkd_bench.registry import SYNTHESIZERS, register_preset
from dfkd_bench.settings import MethodSettings, choice


@SYNTHESIZERS.register
class KDNoise(Synthesizer):
    name = "kd-noise"
    summary = "baseline: KD on Gaussian or uniform noise images (lower bound)"
    is_baseline = True

    @dataclass
    class Config(MethodSettings):
        noise: str = choice("gaussian", "uniform")  # N(0.5, 0.25) clipped to [0, 1], or U(0, 1)

    def synthesize(self) -> SynthBatch:
        shape = (self.ctx.synth_batch_size, *self.ctx.image_shape)
        if self.cfg.noise == "uniform":
            images = torch.rand(shape, device=self.ctx.device)
        else:
            images = (0.5 + 0.25 * torch.randn(shape, device=self.ctx.device)).clamp(0, 1)
        return SynthBatch(images)


register_preset("kd-noise", "quick", dict(QUICK_PROTOCOL))
register_preset("kd-noise", "cpu", dict(CPU_PROTOCOL))
