"""Shared loss terms: BatchNorm statistics, KL distillation, the adversarial term, image priors."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn as nn
import torch.nn.functional as F

from .errors import DfkdError

# Set on a BatchNorm2d module (by sync_bn_statistics) to compute its BN-statistics loss on the global batch.
SYNC_BN_STATS = "dfkd_sync_bn_stats"


def sync_bn_statistics(model: nn.Module) -> None:
    """Make the BN-statistics losses on ``model`` use the batch of all ranks of the process group, as
    SyncBatchNorm does, instead of each rank's own. Only passes with gradients synchronize (a teacher
    pass under no_grad, e.g. labelling a student batch, computes nothing that is optimized)."""
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            setattr(m, SYNC_BN_STATS, True)


def _global_moments(x: torch.Tensor, shift: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and (biased) variance of ``x`` over every rank's batch: each rank's sum, sum of
    squares and count, summed by an autograd-aware all-reduce. As in SyncBatchNorm, each rank's input
    gradient is then world_size times the gradient a single process would get on the global batch, the
    same scale as the rank's local mean terms. Sums are taken around ``shift`` (the running mean, equal
    on every rank) so that E[x^2] - E[x]^2 does not cancel catastrophically."""
    from torch.distributed.nn.functional import all_reduce

    d = x - shift.view(1, -1, 1, 1)
    count = x.new_full((1,), x.numel() / x.shape[1])
    sums = all_reduce(torch.cat([d.sum((0, 2, 3)), (d * d).sum((0, 2, 3)), count]))
    c = x.shape[1]
    mean_d = sums[:c] / sums[-1]
    return shift + mean_d, sums[c:2 * c] / sums[-1] - mean_d * mean_d


class BNStatsHook:
    """Forward hook on one BatchNorm2d layer: compares the batch statistics of its input with
    the layer's running statistics, optionally blended with a moving average of earlier
    batches (``momentum``, Fast's "BN-statistics momentum").

    After a forward pass: ``loss`` is ``||mu - running_mean||_2 + ||var - running_var||_2``
    and ``sample_means`` the per-sample channel means ``(B, C)`` of the input (CMI's features).
    """

    def __init__(self, module: nn.BatchNorm2d, momentum: float = 0.0):
        self.module = module
        self.momentum = momentum
        self.ema: tuple[torch.Tensor, torch.Tensor] | None = None
        self.loss: torch.Tensor | None = None
        self.sample_means: torch.Tensor | None = None
        self._last: tuple[torch.Tensor, torch.Tensor] | None = None
        self.active = True  # off: the hook computes nothing (the teacher's passes outside synthesis)
        self.handle = module.register_forward_hook(self._hook)

    def _hook(self, module: nn.BatchNorm2d, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        if not self.active:
            return
        x = inputs[0].float()
        self.sample_means = x.mean(dim=(2, 3))
        if getattr(module, SYNC_BN_STATS, False) and torch.is_grad_enabled():
            mean, var = _global_moments(x, module.running_mean.float())
        else:
            mean = self.sample_means.mean(0)
            var = x.permute(1, 0, 2, 3).flatten(1).var(1, unbiased=False)
        self._last = (mean.detach(), var.detach())
        if self.momentum > 0 and self.ema is not None:
            mean = self.momentum * self.ema[0] + (1 - self.momentum) * mean
            var = self.momentum * self.ema[1] + (1 - self.momentum) * var
        self.loss = torch.linalg.vector_norm(mean - module.running_mean.float()) + \
            torch.linalg.vector_norm(var - module.running_var.float())

    def update_ema(self) -> None:
        """Fold the last batch's statistics into the moving average (call once per synthesis round)."""
        if self._last is None:
            return
        if self.ema is None:
            self.ema = self._last
        else:
            m = self.momentum
            self.ema = (m * self.ema[0] + (1 - m) * self._last[0], m * self.ema[1] + (1 - m) * self._last[1])

    def remove(self) -> None:
        self.handle.remove()


class NoBatchNormError(DfkdError, ValueError):
    """A BN-statistics loss was asked of a model without BatchNorm2d layers (the runner names the method)."""


def require_batchnorm(model: nn.Module) -> list[nn.BatchNorm2d]:
    """The BatchNorm2d layers of ``model`` (timm's BatchNormAct2d subclasses it), in module order.
    Raises :class:`NoBatchNormError` when it has none: its BN-statistics loss would be undefined."""
    layers = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    if not layers:
        raise NoBatchNormError(f"{type(model).__name__} has no BatchNorm2d layer; BN-statistics methods need one")
    return layers


class BNStatistics:
    """Hooks on every BatchNorm2d layer of ``model``; raises :class:`NoBatchNormError` when it has none."""

    def __init__(self, model: nn.Module, momentum: float = 0.0, active: bool = True):
        self.hooks = [BNStatsHook(m, momentum) for m in require_batchnorm(model)]
        self.set_active(active)

    def set_active(self, active: bool) -> None:
        """Switch every hook on or off. A method that owns hooks on the teacher keeps them off outside its
        synthesis, so the runner's teacher passes (student steps, evaluation) pay nothing for them."""
        for h in self.hooks:
            h.active = active

    @contextmanager
    def recording(self) -> Iterator[None]:
        """The hooks on for the duration of the block."""
        self.set_active(True)
        try:
            yield
        finally:
            self.set_active(False)

    def loss(self) -> torch.Tensor:
        """The BN-statistics loss of the last forward pass, summed over layers."""
        return torch.stack([h.loss for h in self.hooks]).sum()

    def features(self) -> torch.Tensor:
        """Concatenated per-sample channel means of every BN layer's input, ``(B, sum C_l)``."""
        return torch.cat([h.sample_means for h in self.hooks], dim=1)

    def update_ema(self) -> None:
        for h in self.hooks:
            h.update_ema()

    def state_dict(self) -> dict:
        return {"ema": [h.ema for h in self.hooks]}

    def load_state_dict(self, state: dict) -> None:
        # checkpoints load onto the CPU; the averages must live where the teacher runs
        for h, ema in zip(self.hooks, state["ema"]):
            device = h.module.running_mean.device
            h.ema = None if ema is None else tuple(t.to(device) for t in ema)

    def clear(self) -> None:
        """Drop the last forward's results, which hold its graph (and the generator it came from)."""
        for h in self.hooks:
            h.loss = h.sample_means = None

    def remove(self) -> None:
        for h in self.hooks:
            h.remove()


def bn_statistics_loss(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """One-shot BN-statistics loss of ``model`` on ``x`` (hooks added and removed)."""
    stats = BNStatistics(model)
    try:
        model(x)
        return stats.loss()
    finally:
        stats.remove()


def kl_divergence(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float,
                  reduction: str = "batchmean") -> torch.Tensor:
    """KL(softmax(t/T) || softmax(s/T)) * T^2; ``reduction='none'`` gives one value per sample."""
    log_p_s = F.log_softmax(student_logits.float() / temperature, dim=1)
    p_t = F.softmax(teacher_logits.float() / temperature, dim=1)
    kl = F.kl_div(log_p_s, p_t, reduction="none").sum(1) * temperature**2
    return kl.mean() if reduction == "batchmean" else kl


def adversarial_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Masked competition term: minus the student-teacher KL on samples where they still agree."""
    agree = (student_logits.argmax(1) == teacher_logits.argmax(1)).float()
    return -(kl_divergence(student_logits, teacher_logits, 1.0, reduction="none") * agree).mean()


def clamped_js_divergence(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                          temperature: float = 3.0) -> torch.Tensor:
    """The ``datafree`` package's ``jsdiv``: with P, Q the softened distributions and M their mean,
    each clamped to [0.01, 0.99], ``0.5 * KL(M || P) + 0.5 * KL(M || Q)`` (batch mean). DeepInversion
    maximizes it as its adversarial term."""
    p = F.softmax(student_logits.float() / temperature, dim=1)
    q = F.softmax(teacher_logits.float() / temperature, dim=1)
    m = (0.5 * (p + q)).clamp(0.01, 0.99)
    p, q = p.clamp(0.01, 0.99), q.clamp(0.01, 0.99)
    return 0.5 * F.kl_div(p.log(), m, reduction="batchmean") + 0.5 * F.kl_div(q.log(), m, reduction="batchmean")


def total_variation(x: torch.Tensor) -> torch.Tensor:
    """Mean absolute difference of neighbouring pixels: horizontal, vertical and both diagonals."""
    return ((x[..., :, 1:] - x[..., :, :-1]).abs().mean()
            + (x[..., 1:, :] - x[..., :-1, :]).abs().mean()
            + (x[..., 1:, 1:] - x[..., :-1, :-1]).abs().mean()
            + (x[..., 1:, :-1] - x[..., :-1, 1:]).abs().mean())


def mean_prediction_neg_entropy(logits: torch.Tensor) -> torch.Tensor:
    """``sum_k p_k ln p_k`` of the batch's mean softmax ``p``: minimizing it spreads the batch's
    predictions over the classes (DAFL's information-entropy term, the datafree package's "balance")."""
    p = F.softmax(logits.float(), dim=1).mean(0)
    return (p * p.clamp_min(1e-12).log()).sum()
