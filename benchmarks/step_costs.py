"""Seconds per step on this machine: one student KD step and one synthesis step of each method.

Usage: .venv/bin/python benchmarks/step_costs.py [BATCH]   (default 128; needs the shipped teacher)
"""

from __future__ import annotations

import sys
import time

import torch

from dfkd_bench.config import resolve_config
from dfkd_bench.data import Normalizer, get_dataset
from dfkd_bench.losses import kl_divergence
from dfkd_bench.method import SynthContext
from dfkd_bench.registry import SYNTHESIZERS, load_plugins
from dfkd_bench.teachers import load_teacher
from dfkd_bench.zoo import create_model

STEPS = 3


def main(batch: int) -> None:
    load_plugins()
    spec = get_dataset("fashion-mnist")
    teacher, _ = load_teacher(spec, "wrn16_2")
    student = create_model("wrn16_1", spec.num_classes, spec.channels, spec.image_size)
    opt = torch.optim.SGD(student.parameters(), lr=0.1)
    x = torch.randn(batch, *spec.image_shape)
    for i in range(STEPS + 1):
        if i == 1:  # the first step warms up allocations
            start = time.time()
        with torch.no_grad():
            t = teacher(x)
        loss = kl_divergence(student(x), t, 20.0)
        opt.zero_grad()
        loss.backward()
        opt.step()
    print(f"kd step (wrn16_2 -> wrn16_1, batch {batch}): {(time.time() - start) / STEPS:.3f} s")
    student.eval().requires_grad_(False)
    for name, cls in SYNTHESIZERS.items():
        if cls.is_baseline:
            continue
        _, method_cfg, _ = resolve_config(name, "cpu", {"method.g_steps": STEPS})
        ctx = SynthContext(teacher, student, spec.image_shape, spec.num_classes, Normalizer(spec.mean, spec.std),
                           torch.device("cpu"), batch, student_lr=0.1)
        method = cls(ctx, method_cfg)
        method.synthesize()
        start = time.time()
        method.synthesize()
        print(f"{name} synthesis step (batch {batch}): {(time.time() - start) / STEPS:.3f} s")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 128)
