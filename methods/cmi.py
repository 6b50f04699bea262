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
from dfkd_bench.generative import GeneratorConfig, GeneratorSynthesizer
from dfkd_bench.method import SynthBatch, SynthContext
from dfkd_bench.presets import CPU_PROTOCOL, QUICK_PROTOCOL
from dfkd_bench.registry import SYNTHESIZERS, register_preset


def info_nce(anchor: torch.Tensor, positive: torch.Tensor, negatives: torch.Tensor,
             temperature: float) -> torch.Tensor:
    """Mean InfoNCE loss over the batch.

    Row ``i`` of ``anchor`` (N, D) must pick out row ``i`` of ``positive`` (N, D) among all
    rows of ``positive`` (the other samples act as negatives) and all rows of ``negatives``
    (M, D, M may be 0). Inputs are expected L2-normalized, so logits are cosine / temperature.
    """
    candidates = torch.cat([positive, negatives])
    logits = anchor @ candidates.T / temperature
    target = torch.arange(len(anchor), device=anchor.device)
    return F.cross_entropy(logits, target)


class ProjectionHead(nn.Module):
    """Linear-ReLU-Linear with an L2-normalized output, the contrastive projection."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        # hidden width = input width, as in the reference code
        self.mlp = nn.Sequential(nn.Linear(dim_in, dim_in), nn.ReLU(inplace=True), nn.Linear(dim_in, dim_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.mlp(x), dim=1)


class MemoryBank(nn.Module):
    """A FIFO store of at most ``capacity`` feature rows.

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
    summary = "generator inversion (BN + CE + adv) + InfoNCE between global/local views against a memory bank"

    @dataclass
    class Config(GeneratorConfig):
        cr: float = 0.8  # contrastive weight
        cr_T: float = 0.2  # InfoNCE temperature
        bank_size: int = 40000  # memory bank capacity, in features
        n_negatives: int = 4096  # bank features drawn as extra negatives per step
        head_dim: int = 256  # projection head output
        local_scale: tuple[float, float] = (0.25, 1.0)  # area range of the local view's crop

    def __init__(self, ctx: SynthContext, cfg: Config):
        super().__init__(ctx, cfg)
        # a BN layer's input has num_features channels, so this is the width of bn_stats.features()
        dim = sum(h.module.num_features for h in self.bn_stats.hooks)
        self.head = ProjectionHead(dim, cfg.head_dim)
        self.bank = MemoryBank(cfg.bank_size, dim)
        self.local_augment = resized_crop_flip(ctx.image_shape[1], tuple(cfg.local_scale))

    def extra_param_groups(self) -> list[dict[str, Any]]:
        return [{"params": list(self.head.parameters()), "lr": self.cfg.lr_g}]

    def extra_terms(self, images: torch.Tensor, x: torch.Tensor, y: torch.Tensor,
                    t_logits: torch.Tensor, s_logits: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.cfg.cr <= 0:
            return {}
        # the loop has just run the teacher on x, the global view
        global_features = self.bn_stats.features()
        with self.ctx.autocast():
            self.ctx.teacher(self.ctx.normalizer(self.local_augment(images)))
        local_features = self.bn_stats.features()
        negatives = self.bank.sample(self.cfg.n_negatives, images.device)
        n = len(images)
        # one head pass for all three sets, so the bank negatives also train the head
        projected = self.head(torch.cat([global_features, local_features, negatives]))
        anchor, positive, bank = projected[:n], projected[n:2 * n], projected[2 * n:]
        return {"cr": self.cfg.cr * info_nce(anchor, positive, bank, self.cfg.cr_T)}

    @torch.no_grad()
    def after_round(self, generator: nn.Module, batch: SynthBatch) -> None:
        n = len(batch.images)
        if self.cfg.cr > 0:
            # the local views cost a second teacher pass per step
            batch.teacher_passes += n * self.cfg.g_steps
            # the loop keeps the best images, not their features: one forward recovers them
            with self.ctx.autocast():
                self.ctx.teacher(self.ctx.normalizer(self.augment(batch.images)))
            self.bank.add(self.bn_stats.features())


# Published: CIFAR-10, WRN-40-2 -> WRN-16-1 and ResNet-34 -> ResNet-18 (methods.md). Start the
# main run from a "bank" run's pool: --init-bank <bank run folder>.
register_preset("cmi", "paper", {
    "epochs": 100, "ep_steps": 2000, "kd_steps": 2000, "batch_size": 128, "synth_batch_size": 200,
    "lr": 0.1, "momentum": 0.9, "weight_decay": 1e-4, "temperature": 20.0, "method.g_steps": 500,
})
# The init bank: 400 rounds x 200 images, no distillation. 20 epochs of 20 rounds rather than
# one epoch of 400, so the long synthesis checkpoints (and can resume) every 20 rounds.
register_preset("cmi", "bank", {
    "synthesis_only": True, "epochs": 20, "ep_steps": 20, "kd_steps": 1, "synth_batch_size": 200,
    "method.g_steps": 500,
})
register_preset("cmi", "quick", {**QUICK_PROTOCOL, "method.g_steps": 20})
register_preset("cmi", "cpu", {**CPU_PROTOCOL, "method.g_steps": 30})
