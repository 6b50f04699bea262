"""The runner's plumbing cost: one round through the Runner against the same network passes done bare.

For each method, in one process, it builds a Runner on the shipped Fashion-MNIST teacher (WRN-16-2 ->
WRN-16-1) and times, interleaved over several repetitions:

- synthesis: ``Runner._synthesize`` (the guard, the rank gather, the finiteness check, handing the batch to
  the pool, the counters) against ``method.synthesize()`` called bare on the same method;
- student steps: ``Runner._distill_step`` (pool sampling, the GradScaler, the loss checks and rank means)
  against a bare step: the same augmentation, teacher forward, distillation loss (student forward, and a
  loss's own head), backward, SGD step and the method's after-step passes (CSD's rotation head) on one
  fixed batch, nothing else. A "fresh" method (DAFL, DFAD, DFQ, ZSKT, AdaDFKD, SpaceshipNet) draws a new
  batch from its generator for every student step; its bare step calls ``method.sample()`` under no_grad
  the same way, since that generator pass is arithmetic a step cannot avoid (the runner counts its
  seconds as synthesis).

It prints the median seconds and their ratio (runner / bare) per method; the project's target is at most
1.10x. ``--profile METHOD`` prints ``torch.profiler``'s table of one runner round of that method instead.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/overhead.py [--methods fast,cmi] [--reps 5]
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch

from dfkd_bench.config import resolve_config
from dfkd_bench.engine import Runner
from dfkd_bench.method import Outputs
from dfkd_bench.registry import SYNTHESIZERS, load_plugins

SETTINGS = {"batch_size": 128, "synth_batch_size": 128, "kd_steps": 20, "ep_steps": 20, "epochs": 1,
            "warmup_epochs": 0}


def build(method: str, folder: Path, overrides: dict | None = None, store: Path | None = None) -> Runner:
    values = dict(SETTINGS)
    if "g_steps" in SYNTHESIZERS.get(method).Config.__dataclass_fields__:
        values["method.g_steps"] = 5
    cfg, method_cfg, loss_cfg = resolve_config(method, "cpu", {**values, **(overrides or {})})
    return Runner(cfg, method_cfg, loss_cfg, folder / method, store)


def bare_step(runner: Runner, images: torch.Tensor, labels: torch.Tensor | None,
              optimizer: torch.optim.Optimizer) -> None:
    """One student step with nothing but the network passes the runner's step makes: a fresh method's
    ``sample()`` (its generator pass; a pool method trains on ``images`` and ``labels`` as given),
    augmentation, the teacher's forward, the run's distillation loss (the student's forward and any head of
    the loss), backward, the optimizer step and the method's after-step passes; no pool, scaler, rank means
    or checks."""
    if SYNTHESIZERS.get(runner.cfg.method).batch_source == "fresh":
        with torch.no_grad():
            batch = runner.method.sample(len(images))
        images, labels = batch.images, batch.labels
    x = runner.normalizer(runner.augment(images))
    with torch.no_grad():
        feats = runner.teacher.forward_features(x)
        t = Outputs(feats, runner.teacher.forward_head(feats))
    loss = sum(runner.student_loss(x, t, labels).values())
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    runner.method.after_student_step(x, labels)  # the method's own passes (CSD trains its rotation head here)


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def measure(method: str, reps: int, folder: Path, overrides: dict | None = None,
            store: Path | None = None) -> dict[str, float]:
    """Median seconds of a synthesis round and of a round's student steps, through the runner and bare."""
    runner = build(method, folder, overrides, store)
    terms: dict[str, list[float]] = defaultdict(list)
    runner.method.ctx.student_lr = runner.optimizer.param_groups[0]["lr"]
    runner.method.on_epoch_start(0, False)
    runner._synthesize(terms)  # warm-up: allocations, a pool to draw from
    images, labels = runner.batches.next()
    bare_opt = torch.optim.SGD(runner.params, lr=1e-4, momentum=0.9)
    out: dict[str, list[float]] = defaultdict(list)

    def bare_synthesis() -> None:
        runner.student.eval().requires_grad_(False)
        runner.method.synthesize()
        runner.student.train().requires_grad_(True)

    for _ in range(reps):  # interleaved, so a busy moment hits both sides
        out["synth runner"].append(timed(lambda: runner._synthesize(terms)))
        out["synth bare"].append(timed(bare_synthesis))
        out["step runner"].append(timed(lambda: [runner._distill_step(terms) for _ in range(runner.cfg.kd_steps)]))
        out["step bare"].append(timed(lambda: [bare_step(runner, images, labels, bare_opt)
                                               for _ in range(runner.cfg.kd_steps)]))
    return {k: statistics.median(v) for k, v in out.items()}


def profile(method: str, folder: Path) -> None:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    runner = build(method, folder)
    terms: dict[str, list[float]] = defaultdict(list)
    runner._synthesize(terms)
    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        runner._synthesize(terms)
        for _ in range(runner.cfg.kd_steps):
            runner._distill_step(terms)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--methods", default="", help="comma-separated (default: every method, no baselines)")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--profile", default="", metavar="METHOD")
    parser.add_argument("--set", dest="assignments", action="append", default=[], metavar="KEY=VALUE",
                        help="a run setting for every method (e.g. channels_last=true); repeatable")
    args = parser.parse_args(argv)
    overrides = dict(a.split("=", 1) for a in args.assignments)
    load_plugins()
    with tempfile.TemporaryDirectory() as tmp:
        if args.profile:
            return profile(args.profile, Path(tmp))
        names = args.methods.split(",") if args.methods else [n for n, c in SYNTHESIZERS.items() if not c.is_baseline]
        print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; settings {SETTINGS | overrides}; "
              f"median of {args.reps} interleaved repetitions; student steps: {SETTINGS['kd_steps']} per round")
        print("| method | synthesis runner s | bare s | ratio | student steps runner s | bare s | ratio |")
        print("|---|---|---|---|---|---|---|")
        for name in names:
            m = measure(name, args.reps, Path(tmp), overrides)
            print(f"| {name} | {m['synth runner']:.3f} | {m['synth bare']:.3f} | "
                  f"{m['synth runner'] / m['synth bare']:.2f} | {m['step runner']:.3f} | {m['step bare']:.3f} | "
                  f"{m['step runner'] / m['step bare']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
