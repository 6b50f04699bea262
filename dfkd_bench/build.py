"""The parts of a run, each built by one small function; :class:`dfkd_bench.engine.Runner` composes them.

The order in which the runner calls these is part of a run's identity: model initializations
draw from the seeded generator, so building in another order changes every number.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from .config import RunConfig
from .data import DatasetSpec, Normalizer, sealed
from .errors import DfkdError
from .losses import NoBatchNormError
from .method import DistillLoss, LossContext, Outputs, SynthContext, Synthesizer
from .pool import SamplePool
from .registry import LOSSES, SYNTHESIZERS
from .rundir import POOL
from .runtime import safe_load
from .teachers import load_teacher, teacher_normalization
from .zoo import create_model


class StudentLoss(nn.Module):
    """The student's forward pass and the distillation loss as one module: what a student step
    differentiates, so that one DistributedDataParallel wrapper also covers the loss's own parameters."""

    def __init__(self, student: nn.Module, loss_fn: DistillLoss):
        super().__init__()
        self.student, self.loss_fn = student, loss_fn

    def forward(self, x: torch.Tensor, t: Outputs, y: torch.Tensor | None) -> dict[str, torch.Tensor]:
        s_feat = self.student.forward_features(x)
        return self.loss_fn(Outputs(s_feat, self.student.forward_head(s_feat)), t, y)


def build_models(cfg: RunConfig, spec: DatasetSpec, store: Path | None,
                 device: torch.device) -> tuple[nn.Module, dict[str, Any], nn.Module, Normalizer]:
    """The frozen teacher, its sidecar, the student (a trainable copy of the teacher for a
    ``student_is_teacher`` baseline), both on ``device``, and the teacher's normalization (its sidecar's),
    which synthesis, the student's steps and evaluation all use. Teacher first: its construction draws
    from the seeded generator before the student's initialization does."""
    checkpoint = Path(cfg.teacher_checkpoint) if cfg.teacher_checkpoint else None
    teacher, meta = load_teacher(spec, cfg.teacher, store, checkpoint)
    teacher.to(device)
    if SYNTHESIZERS.get(cfg.method).student_is_teacher:
        student = copy.deepcopy(teacher).requires_grad_(True)
        student.dfkd_name = meta.get("arch")
    else:
        student = create_model(cfg.student, spec.num_classes, spec.channels, spec.image_size)
    if cfg.channels_last:  # an option, off by default: its measured effect is in results/speed/
        teacher.to(memory_format=torch.channels_last)
        student.to(memory_format=torch.channels_last)
    if cfg.compile:  # an option, off by default: its measured effect is in results/speed/
        # a fresh budget of compiled variants for this run: dynamo counts them per function, and a local sweep
        # builds every run's models in one process (WRN teacher and student share one forward_features)
        torch._dynamo.reset()
        compile_features(teacher)
        compile_features(student)
    return teacher, meta, student.to(device), Normalizer(*teacher_normalization(meta, spec)).to(device)


def compile_features(model: nn.Module) -> None:
    """Replace ``model.forward_features`` (the backbone: every convolution and BatchNorm, and the hooks that
    methods put on them) with its ``torch.compile`` version, in place.

    ``forward`` and every caller of ``forward_features`` (synthesis, student steps, evaluation) then run the
    compiled backbone; the head (pool + linear) stays eager. Parameters, buffers and ``state_dict`` are the
    module's own, so checkpoints are those of an uncompiled run. Compilation happens lazily, once per new
    input shape, train/eval mode or grad mode (dynamo's guards), which costs tens of seconds per variant on a
    CPU. Must come after any ``copy.deepcopy`` of the model: a copy would keep calling the original's compiled
    backbone.

    Methods switch their hooks on and off between passes (BN-statistics hooks are off outside synthesis),
    so dynamo is told to guard on module hooks (``skip_nnmodule_hook_guards = False``, a process-wide
    setting). With dynamo's default, which skips those guards, a Fast run's BN hooks did not run on the
    compiled teacher during synthesis (tests/test_engine.py, the ``compile`` run test).
    """
    torch._dynamo.config.skip_nnmodule_hook_guards = False
    model.forward_features = torch.compile(model.forward_features)


def build_method(cfg: RunConfig, method_cfg: Any, ctx: SynthContext) -> Synthesizer:
    """The method, built sealed (no real data reachable).

    Raises:
        DfkdError: the method matches BatchNorm statistics and the teacher has no BatchNorm layer.
    """
    with sealed():
        try:
            return SYNTHESIZERS.get(cfg.method)(ctx, method_cfg).to(ctx.device)
        except NoBatchNormError:
            raise DfkdError(f"method '{cfg.method}' matches the teacher's BatchNorm statistics, but teacher "
                            f"'{cfg.teacher}' ({type(ctx.teacher).__name__}) has no BatchNorm layer; choose a "
                            "teacher with BatchNorm or a method without a BN-statistics term") from None


def build_loss(cfg: RunConfig, loss_cfg: Any, teacher: nn.Module, student: nn.Module, spec: DatasetSpec,
               device: torch.device) -> DistillLoss:
    """The distillation loss (it may own parameters: CSD's alignment head).

    Raises:
        DfkdError: the loss needs labels and the method keeps none, or ``compile`` is on and the loss cannot
            work on compiled backbones (:meth:`DistillLoss.compilable`).
    """
    loss_cls = LOSSES.get(cfg.loss)
    if cfg.compile and not loss_cls.compilable(loss_cfg):
        raise DfkdError(f"loss '{cfg.loss}' differentiates with respect to the backbone's intermediate feature maps, "
                        "which a compiled backbone does not expose; run it without --set compile=true")
    loss_fn = loss_cls(LossContext(teacher, student, spec.image_shape, spec.num_classes, cfg.temperature),
                       loss_cfg).to(device)
    if loss_fn.needs_labels and not SYNTHESIZERS.get(cfg.method).uses_labels:
        raise DfkdError(f"loss '{cfg.loss}' needs labels, but method '{cfg.method}' does not keep them")
    return loss_fn


def build_optimizer(cfg: RunConfig, params: list[nn.Parameter]) -> torch.optim.Optimizer:
    """The student's optimizer: SGD (momentum, weight decay) or Adam (``cfg.optimizer``)."""
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def build_scheduler(cfg: RunConfig, optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LRScheduler:
    """Stepped once per distillation epoch: cosine to ``lr_min`` over the epochs after the warm-up, or
    ``step`` (milestones count from the end of the warm-up)."""
    if cfg.lr_schedule == "step":
        return torch.optim.lr_scheduler.MultiStepLR(
            optimizer, [m - cfg.warmup_epochs for m in cfg.lr_milestones], gamma=cfg.lr_gamma)
    return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, cfg.epochs - cfg.warmup_epochs),
                                                      eta_min=cfg.lr_min)


def build_pool(cfg: RunConfig, spec: DatasetSpec, run_dir: Path, needs_labels: bool, reporter: Any) -> SamplePool:
    """The student's pool: empty, filled with a real split for a real-data baseline (real data enters the run
    here, never through a method), and extended by ``--init-bank`` (reported to ``reporter.message``)."""
    pool = SamplePool(cfg.pool_in_memory, run_dir / "pool_spill" if cfg.pool_in_memory else None)
    split = SYNTHESIZERS.get(cfg.method).real_data_split
    if split is not None:
        pool.add(*spec.load(split))
    if cfg.init_bank:
        reporter.message(load_init_bank(pool, Path(cfg.init_bank), spec.image_shape, needs_labels, cfg))
    return pool


def load_init_bank(pool: SamplePool, bank_dir: Path, image_shape: tuple[int, int, int], needs_labels: bool,
                   cfg: RunConfig) -> str:
    """Fill ``pool`` from a synthesis-only run's ``pool.pt`` (``bank_dir`` or the file itself); returns the
    line that says so.

    Raises:
        DfkdError: no pool there, not a pool, images of another shape, or no labels when ``needs_labels``.
    """
    path = bank_dir / POOL if bank_dir.is_dir() else bank_dir
    if not path.is_file():
        raise DfkdError(f"no pool in {bank_dir}; build one with a synthesis-only run (--set synthesis_only=true)")
    state = safe_load(path, "pool")
    try:
        pool.load_state_dict(state)
    except (RuntimeError, KeyError, TypeError, ValueError, AttributeError, IndexError) as exc:
        raise DfkdError(f"{path} is not a pool saved by a synthesis-only run ({type(exc).__name__})") from None
    if tuple(pool.tensors()[0].shape[1:]) != image_shape:
        raise DfkdError(f"the init bank in {bank_dir} holds images of another shape")
    if needs_labels and not pool.has_labels:
        raise DfkdError(f"the init bank in {bank_dir} has no labels, which '{cfg.method}' with loss "
                        f"'{cfg.loss}' needs; build the bank with a method that keeps labels")
    return f"init bank: {len(pool)} images from {bank_dir}"


__all__ = ["StudentLoss", "build_loss", "build_method", "build_models", "build_optimizer", "build_pool",
           "build_scheduler", "load_init_bank"]
