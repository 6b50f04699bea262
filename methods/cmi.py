"""CMI, contrastive model inversion (Fang et al., IJCAI 2021): generator inversion plus a
contrastive term that pushes each synthesized sample away from the others and from a memory
bank of earlier samples, so the pool stays diverse instead of collapsing onto a few modes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from dfkd_bench.augment import resized_crop_flip
from dfkd_bench.errors import DfkdError
from dfkd_bench.generative import GeneratorConfig, GeneratorSynthesizer
from dfkd_bench.method import SynthBatch, SynthContext
from dfkd_bench.presets import CPU_PROTOCOL, QUICK_PROTOCOL
from dfkd_bench.registry import SYNTHESIZERS, register_preset
from dfkd_bench.settings import at_least, choice
from dfkd_bench.zoo import stage_modules


def cmi_contrastive_loss(local: torch.Tensor, global_: torch.Tensor, n_current: int,
                         temperature: float) -> torch.Tensor:
    """CMI's InfoNCE between projected views, as the authors compute it.

    Rows are samples: the current batch first (``n_current`` rows), then the memory bank's.
    Row ``i`` of ``local`` must pick out row ``i`` of ``global_`` among all of its rows (the
    global views are targets only: no gradient flows through them). The cross entropy is averaged
    over the current rows and over the bank's rows separately and the two means are added, so the
    bank's many rows do not drown the current batch's gradient.
    """
    logits = local @ global_.detach().T / temperature
    per_row = F.cross_entropy(logits, torch.arange(len(local), device=local.device), reduction="none")
    if len(local) > n_current:
        return per_row[:n_current].mean() + per_row[n_current:].mean()
    return per_row.mean()


class ProjectionHead(nn.Module):
    """Linear-ReLU-Linear with an L2-normalized output, the contrastive projection."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        # hidden width = input width, as in the reference code
        self.mlp = nn.Sequential(nn.Linear(dim_in, dim_in), nn.ReLU(inplace=True), nn.Linear(dim_in, dim_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.mlp(x), dim=1)


class MemoryBank(nn.Module):
    """A ring buffer of at most ``capacity`` feature rows (the authors' MemoryBank).

    It grows as rows arrive (a preallocated 40000-row buffer would bloat early checkpoints),
    so it is checkpointed through ``get_extra_state`` rather than as a fixed-shape buffer.
    """

    def __init__(self, capacity: int, dim: int):
        super().__init__()
        if capacity < 1:
            raise ValueError(f"the memory bank needs a positive capacity, got {capacity}")
        self.capacity = capacity
        self.features = torch.empty(0, dim)
        self.next = 0  # the row the next feature overwrites once the bank is full

    def __len__(self) -> int:
        return len(self.features)

    @torch.no_grad()
    def add(self, features: torch.Tensor) -> None:
        """Append rows (detached); once full, overwrite the oldest ones."""
        features = features.detach().float()[-self.capacity:]
        self.features = self.features.to(features.device)  # follow the synthesizer's device
        room = self.capacity - len(self.features)
        self.features = torch.cat([self.features, features[:room]])
        overflow = features[room:]
        rows = (torch.arange(len(overflow), device=features.device) + self.next) % self.capacity
        self.features[rows] = overflow
        self.next = (self.next + len(overflow)) % self.capacity

    def sample(self, k: int, device: torch.device) -> torch.Tensor:
        """Up to ``k`` distinct rows drawn uniformly, on ``device``."""
        idx = torch.randperm(len(self.features))[:k]
        return self.features[idx].to(device)

    def get_extra_state(self) -> dict[str, Any]:
        return {"features": self.features.cpu(), "next": self.next}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.features, self.next = state["features"], int(state["next"])


@SYNTHESIZERS.register
class CMI(GeneratorSynthesizer):
    name = "cmi"
    uses_labels = True  # its targets are known, so CSD's loss (CE on labels) can be paired with it
    summary = "generator inversion (BN + CE + adv) + InfoNCE between local and global views against a memory bank"

    @dataclass
    class Config(GeneratorConfig):
        cr: float = 0.8  # contrastive weight
        cr_T: float = 0.1  # InfoNCE temperature (the published WRN-40-2 scripts; scripts/cmi/cmi_cifar10.sh has 0.2)
        bank_size: int = at_least(1, default=40960)  # memory bank capacity, in samples (datafree_kd.py's 40960)
        n_negatives: int = 4096  # bank samples drawn per step
        head_dim: int = at_least(1, default=256)  # projection head output
        head_lr: float = 0.0  # the head's own Adam (default betas), one for the run; 0: lr_g, as the authors
        local_scale: tuple[float, float] = (0.25, 1.0)  # area range of the local view's crop
        # "bn": per-sample channel means of every teacher BN layer's input (the authors' default);
        # "stages": of the teacher's stage outputs, which the authors use for a ResNet-34 teacher only
        features: str = choice("bn", "stages")

        def check(self) -> None:
            scale = tuple(self.local_scale)
            if len(scale) != 2 or not 0 < scale[0] <= scale[1] <= 1:
                raise DfkdError(f"{self.key('local_scale')} must be two areas 0 < low <= high <= 1, "
                                f"got {','.join(map(str, scale))}")

    def __init__(self, ctx: SynthContext, cfg: Config):
        super().__init__(ctx, cfg)
        modules = ([h.module for h in self.bn_stats.hooks] if cfg.features == "bn"
                   else stage_modules(ctx.teacher))
        self.feature_hooks = [InstanceMeans(m) for m in modules]
        c, h, _ = ctx.image_shape
        with torch.no_grad():
            ctx.teacher(torch.zeros(1, c, h, h, device=ctx.device))
        dim = self._teacher_features().shape[1]
        self._set_feature_hooks(False)  # on during synthesis only, as the BN hooks
        self.head = ProjectionHead(dim, cfg.head_dim)
        self.head_optimizer = torch.optim.Adam(self.head.parameters(), lr=cfg.head_lr or cfg.lr_g)
        self.bank = MemoryBank(cfg.bank_size, 2 * dim)  # a row: a sample's local and global features
        self.local_augment = resized_crop_flip(h, tuple(cfg.local_scale))
        self._step_features: torch.Tensor | None = None
        self._best_features: torch.Tensor | None = None

    def _set_feature_hooks(self, active: bool) -> None:
        for hook in self.feature_hooks:
            hook.active = active

    def synthesize(self) -> SynthBatch:
        self._set_feature_hooks(True)
        try:
            return super().synthesize()
        finally:
            self._set_feature_hooks(False)

    def _teacher_features(self) -> torch.Tensor:
        return torch.cat([hook.means for hook in self.feature_hooks], dim=1)

    def extra_terms(self, images: torch.Tensor, x: torch.Tensor, y: torch.Tensor,
                    t_logits: torch.Tensor, s_logits: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.cfg.cr <= 0:
            return {}
        global_features = self._teacher_features()  # the loop has just run the teacher on x, the global view
        with self.ctx.autocast():
            self.ctx.teacher(self.ctx.normalizer(self.local_augment(images)))
        local_features = self._teacher_features()
        self._step_features = torch.cat([local_features, global_features], dim=1).detach()
        cached_local, cached_global = self.bank.sample(self.cfg.n_negatives, images.device).chunk(2, dim=1)
        # one head pass for every row, as the authors do, so the bank's rows also train the head
        projected = self.head(torch.cat([local_features, cached_local, global_features, cached_global]))
        local, global_ = projected.chunk(2)
        return {"cr": self.cfg.cr * cmi_contrastive_loss(local, global_, len(images), self.cfg.cr_T)}

    def after_backward(self) -> None:
        if self.cfg.cr > 0:  # the head learns with G, from the same backward pass
            self.head_optimizer.step()
            self.head_optimizer.zero_grad(set_to_none=True)

    def on_best_step(self) -> None:
        self._best_features = self._step_features

    @torch.no_grad()
    def after_round(self, batch: SynthBatch) -> None:
        if self.cfg.cr > 0:
            batch.teacher_passes += len(batch.images) * self.cfg.g_steps  # the local views' teacher passes
            self.bank.add(self._best_features)  # the views of the best step, as the authors keep them
        self._step_features = self._best_features = None

    def get_extra_state(self) -> dict[str, Any]:
        return {**super().get_extra_state(), "head_optimizer": self.head_optimizer.state_dict()}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        super().set_extra_state(state)
        self.head_optimizer.load_state_dict(state["head_optimizer"])


class InstanceMeans:
    """Forward hook keeping the per-sample channel means of a module's input (a BN layer) or output
    (a stage), the authors' InstanceMeanHook (BN inputs) and their block-output variant."""

    def __init__(self, module: nn.Module):
        self.on_input = isinstance(module, nn.BatchNorm2d)
        self.means: torch.Tensor | None = None
        self.active = True
        module.register_forward_hook(self._keep)

    def _keep(self, module: nn.Module, inputs: Any, output: torch.Tensor) -> None:
        if not self.active:
            return
        source = inputs[0] if self.on_input else output
        self.means = source.float().mean(dim=(2, 3))


# Published: CIFAR-10, WRN-40-2 -> WRN-16-1, "scratch CMI" (scripts/cmi/scratch_cmi_cifar10_wrn402_wrn161.sh,
# 88.82% in the authors' README): no init bank, 200 epochs (datafree_kd.py's default) of one round of 400
# student steps, synthesis batch 256, student batch 128, g_steps 200, cosine over the epochs.
register_preset("cmi", "paper", {
    "epochs": 200, "ep_steps": 400, "kd_steps": 400, "batch_size": 128, "synth_batch_size": 256,
    "lr": 0.1, "momentum": 0.9, "weight_decay": 1e-4, "temperature": 20.0, "method.g_steps": 200,
    "method.adv": 0.5, "method.cr": 0.8, "method.cr_T": 0.1,
})
# The init bank: 400 rounds x 200 images, no distillation. 20 epochs of 20 rounds rather than
# one epoch of 400, so the long synthesis checkpoints (and can resume) every 20 rounds.
register_preset("cmi", "bank", {
    "synthesis_only": True, "epochs": 20, "ep_steps": 20, "kd_steps": 1, "synth_batch_size": 200,
    "method.g_steps": 500,
})
register_preset("cmi", "quick", {**QUICK_PROTOCOL, "method.g_steps": 20})
register_preset("cmi", "cpu", {**CPU_PROTOCOL, "method.g_steps": 30})
