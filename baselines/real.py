"""Reference rows that use real data or the teacher itself: the bounds a DFKD result sits between.

The runner, not these classes, puts the real training split into the pool; each round then
adds nothing and the student trains on uniform samples of the real images.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dfkd_bench.method import SynthBatch, Synthesizer
from dfkd_bench.presets import CPU_PROTOCOL, QUICK_PROTOCOL
from dfkd_bench.registry import SYNTHESIZERS, register_preset
from dfkd_bench.settings import MethodSettings


class _RealDataBaseline(Synthesizer):
    is_baseline = True
    real_data_split = "train"
    uses_labels = True

    @classmethod
    def side_information(cls, cfg) -> str:
        return "real training images and labels"

    @dataclass
    class Config(MethodSettings):
        pass

    def synthesize(self) -> SynthBatch:
        c, h, w = self.ctx.image_shape
        return SynthBatch(torch.empty(0, c, h, w), torch.empty(0, dtype=torch.long))


@SYNTHESIZERS.register
class KDReal(_RealDataBaseline):
    name = "kd-real"
    summary = "baseline: KD from the teacher on the real training set (what data-free KD approximates)"


@SYNTHESIZERS.register
class StudentReal(_RealDataBaseline):
    name = "student-real"
    summary = "baseline: the student trained from scratch on real labels (upper bound)"
    default_loss = "ce"


@SYNTHESIZERS.register
class TeacherBaseline(Synthesizer):
    name = "teacher"
    summary = "baseline: the teacher's own test accuracy"
    is_baseline = True
    student_is_teacher = True

    @dataclass
    class Config(MethodSettings):
        pass


for _name in ("kd-real", "student-real"):
    register_preset(_name, "quick", dict(QUICK_PROTOCOL))
    register_preset(_name, "cpu", dict(CPU_PROTOCOL))
for _preset in ("quick", "cpu", "paper"):
    register_preset("teacher", _preset, {"epochs": 1})
