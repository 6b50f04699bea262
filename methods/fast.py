"""Fast (Fang et al., AAAI 2022), "up to 100x faster" data-free KD.

One generator is shared across all rounds and never reset. A round optimizes it (``fast``)
or a clone of it (``fast_meta``) together with fresh latents for only a few steps, with
BN-statistics momentum in the BatchNorm loss. ``fast_meta`` then meta-updates the shared
generator from the clone (first-order MAML or Reptile), so it learns an initialization that
adapts to a new batch in those few steps. The first ``warmup_epochs`` only synthesize.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from dfkd_bench.errors import DfkdError
from dfkd_bench.generative import GeneratorConfig, GeneratorSynthesizer
from dfkd_bench.method import SynthBatch, SynthContext
from dfkd_bench.presets import CPU_PROTOCOL, QUICK_PROTOCOL
from dfkd_bench.registry import SYNTHESIZERS, register_preset

META_RULES = ("maml", "reptile")


@dataclass
class FastConfig(GeneratorConfig):
    """Fast-5 (methods.md): 5 steps per round; Fast-2 is lr_g 5e-3, lr_z 0.015, Fast-10 lr_g 2e-3."""

    g_steps: int = 5
    lr_g: float = 3e-3
    lr_z: float = 0.01
    bn: float = 10.0
    oh: float = 0.4
    adv: float = 1.1  # WRN pairs; 1.33 for ResNet-34
    bn_momentum: float = 0.9
    reset_generator: bool = False
    reset_first_layer_epoch: int = -1  # epoch (0-based) that re-initializes G's first layer; -1: never


@dataclass
class FastMetaConfig(FastConfig):
    meta: str = "maml"  # "maml" (first-order) or "reptile"
    reptile_eps: float = 0.5  # Reptile step toward the clone's weights (1.0 would be plain `fast`)


class _FastBase(GeneratorSynthesizer):
    """What ``fast`` and ``fast_meta`` share: the scheduled first-layer reset."""

    def on_epoch_start(self, epoch: int, warmup: bool) -> None:
        super().on_epoch_start(epoch, warmup)
        if epoch == self.cfg.reset_first_layer_epoch:
            self.generator.reset_first_layer()


@SYNTHESIZERS.register
class Fast(_FastBase):
    name = "fast"
    summary = "a shared generator optimized a few steps per round, BN-statistics momentum, warm-up (no meta)"
    Config = FastConfig
    # round_generator's default (no reset) already optimizes the shared generator itself.


@SYNTHESIZERS.register
class FastMeta(_FastBase):
    name = "fast_meta"
    summary = "Fast: a few steps on a clone of a shared generator, then a MAML/Reptile meta-update"
    Config = FastMetaConfig

    def __init__(self, ctx: SynthContext, cfg: FastMetaConfig):
        if cfg.meta not in META_RULES:
            raise DfkdError(f"method.meta must be one of {', '.join(META_RULES)}, got {cfg.meta!r}")
        super().__init__(ctx, cfg)
        # persistent across rounds, so the outer loop keeps Adam's moments (checkpointed as extra state)
        self.meta_optimizer = torch.optim.Adam(self.generator.parameters(), lr=cfg.lr_g * cfg.g_steps,
                                               betas=(cfg.beta1, cfg.beta2))

    def round_generator(self) -> nn.Module:
        """A clone of the shared generator; the round optimizes the clone and then drops it."""
        self.meta_optimizer.zero_grad(set_to_none=True)
        return copy.deepcopy(super().round_generator())

    def after_backward(self, generator: nn.Module) -> None:
        if self.cfg.meta != "maml":
            return
        # first-order MAML: the meta-gradient is the sum of the clone's gradients over the inner steps
        for shared, clone in zip(self.generator.parameters(), generator.parameters()):
            if clone.grad is None:
                continue
            if shared.grad is None:
                shared.grad = clone.grad.detach().clone()
            else:
                shared.grad.add_(clone.grad)

    def after_round(self, generator: nn.Module, batch: SynthBatch) -> None:
        if self.cfg.meta == "maml":
            self.meta_optimizer.step()
            self.meta_optimizer.zero_grad(set_to_none=True)
            return
        with torch.no_grad():
            for shared, clone in zip(self.generator.parameters(), generator.parameters()):
                shared.lerp_(clone, self.cfg.reptile_eps)

    def get_extra_state(self) -> dict[str, Any]:
        return {**super().get_extra_state(), "meta_optimizer": self.meta_optimizer.state_dict()}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        super().set_extra_state(state)
        self.meta_optimizer.load_state_dict(state["meta_optimizer"])


# Published: CIFAR, WRN-40-2 -> WRN-16-1, Fast-5; 220 epochs including 20 warm-up epochs,
# first-layer reset at epoch 120 + warm-up. Synthesis batch = student batch (256) in the authors' scripts.
_PAPER = {
    "epochs": 220, "warmup_epochs": 20, "ep_steps": 400, "kd_steps": 400, "batch_size": 256,
    "synth_batch_size": 256, "lr": 0.2, "momentum": 0.9, "weight_decay": 5e-4, "temperature": 20.0,
    "method.g_steps": 5, "method.reset_first_layer_epoch": 140,
}
for _name in ("fast", "fast_meta"):
    register_preset(_name, "paper", _PAPER)
    register_preset(_name, "quick", {**QUICK_PROTOCOL, "warmup_epochs": 1, "method.g_steps": 5})
    register_preset(_name, "cpu", {**CPU_PROTOCOL, "warmup_epochs": 1, "method.g_steps": 5})
