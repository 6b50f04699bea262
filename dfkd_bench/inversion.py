"""The one inversion loop: optimize some parameters for N steps on a sum of loss terms.

Every synthesizer that optimizes something against the teacher runs this loop: the generator
inversion of CMI, Fast and CSD (:mod:`dfkd_bench.generative`), NAYER's loops, DeepInversion's
pixels and the online methods' generator steps. A method supplies the forward pass (what to
optimize and the named, weighted terms); the loop sums the terms, records the curve, keeps the
lowest-loss batch if asked, and steps the optimizer, with hooks around the backward pass.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

# step -> (the images this step's loss was measured on, {term name: weighted scalar loss})
Forward = Callable[[], tuple[torch.Tensor, dict[str, torch.Tensor]]]


@dataclass
class Inversion:
    """What a run of :func:`invert` leaves.

    Attributes:
        best: a copy of the images of the lowest-loss step, taken before that step's update
            (``keep_best``; None otherwise, or when no step had a finite loss).
        last_images: the last step's images (detached), as measured, before its update.
        curve: the summed loss of every step.
        last_terms: the last step's terms as floats.
    """

    best: torch.Tensor | None = None
    last_images: torch.Tensor | None = None
    curve: list[float] = field(default_factory=list)
    last_terms: dict[str, float] = field(default_factory=dict)

    @property
    def kept(self) -> torch.Tensor:
        """The best batch when one was kept, else the last step's images."""
        return self.best if self.best is not None else self.last_images


def invert(optimizer: torch.optim.Optimizer, steps: int, forward: Forward, *, keep_best: bool = True,
           on_best: Callable[[], None] | None = None, after_backward: Callable[[], None] | None = None,
           after_step: Callable[[], None] | None = None) -> Inversion:
    """Run ``steps`` steps of: ``images, terms = forward()``; loss = the sum of ``terms`` (in their order);
    keep ``images`` if the loss is the lowest so far (then ``on_best()``); zero the gradients, backward,
    ``after_backward()``, ``optimizer.step()``, ``after_step()``.

    Args:
        optimizer: steps the optimized parameters; its gradients are set to None before each backward.
        steps: number of steps (>= 0).
        forward: one step's forward pass (it may draw random numbers: augmentations, jitter).
        keep_best: copy the lowest-loss step's images (a strict ``<``: the earliest of equal losses).

    Returns:
        an :class:`Inversion`.
    """
    out = Inversion()
    best_loss = float("inf")
    for _ in range(steps):
        images, terms = forward()
        loss = sum(terms.values())
        value = loss.item()
        out.curve.append(value)
        if keep_best and value < best_loss:  # these images gave this loss: the update below changes them
            best_loss, out.best = value, images.detach().clone()
            if on_best is not None:
                on_best()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if after_backward is not None:
            after_backward()
        optimizer.step()
        if after_step is not None:
            after_step()
        out.last_images = images.detach()
        out.last_terms = {k: v.item() for k, v in terms.items()}
    return out


__all__ = ["Inversion", "invert"]
