"""Fast (Fang et al., AAAI 2022), "up to 100x faster" data-free KD.

One generator is shared across all rounds and never reset. A round optimizes it (``fast``)
or a clone of it (``fast_meta``) together with fresh latents for only a few steps, with
BN-statistics momentum in the BatchNorm loss. ``fast_meta`` then meta-updates the shared
generator from the clone (first-order MAML, or Reptile), so it learns an initialization that
adapts to a new batch in those few steps. The first ``warmup_epochs`` only synthesize.

Details follow the authors' code (github.com/zju-vipa/Fast-Datafree; docs/methods/fast.md):
the generator keeps PyTorch's default initialization; the adversarial term is on from the
``warmup``-th synthesis round, counted in rounds as their ``self.ep`` does; only ``fast_meta``
has the scheduled input-layer reset (``reset_l0``), at round 120 + warm-up.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from dfkd_bench.generative import GeneratorConfig, GeneratorSynthesizer
from dfkd_bench.method import SynthBatch, SynthContext
from dfkd_bench.presets import CPU_PROTOCOL, QUICK_PROTOCOL
from dfkd_bench.registry import SYNTHESIZERS, register_preset
from dfkd_bench.settings import choice


@dataclass
class FastConfig(GeneratorConfig):
    """Fast-5 (the authors' scripts): 5 steps per round; Fast-2 is lr_g 5e-3, lr_z 0.015, Fast-10 lr_g 2e-3."""

    g_steps: int = 5
    lr_g: float = 3e-3
    lr_z: float = 0.01
    bn: float = 10.0
    oh: float = 0.4
    adv: float = 1.1  # WRN pairs; 1.33 for ResNet-34, 1.0 for VGG-11
    bn_momentum: float = 0.9
    reset_generator: bool = False


@dataclass
class FastMetaConfig(FastConfig):
    meta: str = choice("maml", "reptile")  # first-order MAML, or Reptile
    reptile_scale: float = 67.0  # Reptile's meta-gradient is this times (shared - clone) weights (their alpha)
    reset_l0: bool = False  # re-initialize G's input layers once, at round reset_l0_round + warm-up
    reset_l0_round: int = 120


class _FastBase(GeneratorSynthesizer):
    """What ``fast`` and ``fast_meta`` share: rounds counted as the authors' ``self.ep``."""

    def __init__(self, ctx: SynthContext, cfg: FastConfig):
        super().__init__(ctx, cfg)
        self.rounds_done = 0  # synthesis rounds so far, checkpointed

    def on_epoch_start(self, epoch: int, warmup: bool) -> None:
        pass  # the adversarial switch counts rounds, not epochs (round_generator)

    def round_generator(self) -> nn.Module:
        self.rounds_done += 1
        # the authors' `self.ep >= self.ep_start`: on from the warm-up-th round (1-based), which with one
        # round per epoch is the last warm-up epoch
        self.adversarial = self.rounds_done >= self.ctx.warmup_epochs
        return super().round_generator()

    def get_extra_state(self) -> dict[str, Any]:
        return {**super().get_extra_state(), "rounds_done": self.rounds_done}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        super().set_extra_state(state)
        self.rounds_done = int(state["rounds_done"])


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
        super().__init__(ctx, cfg)
        # persistent across rounds, so the outer loop keeps Adam's moments (checkpointed as extra state)
        self.meta_optimizer = torch.optim.Adam(self.generator.parameters(), lr=cfg.lr_g * cfg.g_steps,
                                               betas=(cfg.beta1, cfg.beta2))
        self.round_clone: list[nn.Module] = []  # the generator this round optimizes

    def round_generator(self) -> nn.Module:
        """A clone of the shared generator; the round optimizes the clone and then drops it."""
        shared = super().round_generator()
        if self.cfg.reset_l0 and self.rounds_done == self.cfg.reset_l0_round + self.ctx.warmup_epochs:
            shared.reset_input_layers()
        self.meta_optimizer.zero_grad(set_to_none=True)
        # a plain list, not an attribute: a module attribute would make the clone a submodule (in state_dict)
        self.round_clone[:] = [copy.deepcopy(shared)]
        return self.round_clone[0]

    def after_backward(self) -> None:
        if self.cfg.meta != "maml":
            return
        # first-order MAML: the meta-gradient is the sum of the clone's gradients over the inner steps
        for shared, clone in zip(self.generator.parameters(), self.round_clone[0].parameters()):
            if clone.grad is None:
                continue
            if shared.grad is None:
                shared.grad = clone.grad.detach().clone()
            else:
                shared.grad.add_(clone.grad)

    def after_round(self, batch: SynthBatch) -> None:
        if self.cfg.meta == "reptile":
            # Reptile as the authors write it: a gradient pointing from the clone back to the shared weights
            for shared, clone in zip(self.generator.parameters(), self.round_clone[0].parameters()):
                shared.grad = (shared.detach() - clone.detach()) * self.cfg.reptile_scale
        self.meta_optimizer.step()
        self.meta_optimizer.zero_grad(set_to_none=True)
        self.round_clone.clear()  # the round's copy is spent

    def get_extra_state(self) -> dict[str, Any]:
        return {**super().get_extra_state(), "meta_optimizer": self.meta_optimizer.state_dict()}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        super().set_extra_state(state)
        self.meta_optimizer.load_state_dict(state["meta_optimizer"])


# Published: CIFAR, WRN-40-2 -> WRN-16-1, Fast-5 (scripts/fast_cifar.sh): 220 epochs including 20 warm-up
# epochs, one round of 400 student steps per epoch, the synthesis batch = the student batch (256), lr 0.2,
# weight decay 1e-4 (datafree_kd.py's default; the scripts do not set it), cosine to 2e-4 over the 200
# distillation epochs. Fast-Meta also resets G's input layers at round 120 + warm-up (--reset_l0 1).
_PAPER = {
    "epochs": 220, "warmup_epochs": 20, "ep_steps": 400, "kd_steps": 400, "batch_size": 256,
    "synth_batch_size": 256, "lr": 0.2, "lr_min": 2e-4, "momentum": 0.9, "weight_decay": 1e-4,
    "temperature": 20.0, "method.g_steps": 5,
}
register_preset("fast", "paper", _PAPER)
register_preset("fast_meta", "paper", {**_PAPER, "method.reset_l0": True})
for _name in ("fast", "fast_meta"):
    register_preset(_name, "quick", {**QUICK_PROTOCOL, "warmup_epochs": 1, "method.g_steps": 5})
    register_preset(_name, "cpu", {**CPU_PROTOCOL, "warmup_epochs": 1, "method.g_steps": 5})
