"""Where the student's batches come from, chosen once when a run is built.

- :class:`PoolBatches`: shuffled passes over every image synthesized so far (the CMI / Fast / CSD
  protocol); a real-data baseline's pool is filled with a real split instead, and is not
  checkpointed (it is reloaded) nor shown as samples.
- :class:`FreshBatches`: a new batch from the method for every student step, nothing pooled (the
  online adversarial methods: DAFL, DFAD, DFQ, ZSKT). Its time counts as synthesis.

Both give images as floats in [0, 1] on the run's device, and labels or None.
"""

from __future__ import annotations

from typing import Any

import torch

from .data import sealed, to_unit
from .errors import NonFiniteError
from .method import SynthBatch, Synthesizer
from .pool import PassSampler, SamplePool, quantize
from .rundir import Counters


class PoolBatches:
    """Batches of ``batch_size`` drawn by ``passes`` (seeded by ``generator``) over ``pool``."""

    def __init__(self, pool: SamplePool, passes: PassSampler, generator: torch.Generator, batch_size: int,
                 device: torch.device, synthetic: bool = True):
        self.pool, self.passes, self.generator = pool, passes, generator
        self.batch_size, self.device, self.synthetic = batch_size, device, synthetic

    def add(self, batch: SynthBatch, keep_labels: bool) -> None:
        """Pool a round's images (labels too, if the method keeps them); the next pass covers them."""
        if len(batch.images):
            self.pool.add(batch.images, batch.labels if keep_labels else None)
        self.passes.restart()

    def next(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        images, labels = self.passes.next_batch(self.pool, self.batch_size)
        return to_unit(images.to(self.device)), labels

    def samples(self) -> torch.Tensor | None:
        """The last 64 pooled images as uint8, or None (an empty or real pool)."""
        return self.pool.last(64) if self.synthetic and len(self.pool) else None

    def state_dict(self) -> dict[str, Any]:
        return {"pool": self.pool.state_dict() if self.synthetic else None, "sampler": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["pool"] is not None:
            self.pool.load_state_dict(state["pool"])
        self.generator.set_state(state["sampler"])


class FreshBatches:
    """``method.sample(batch_size)`` for every student step; images and teacher passes are counted
    (summed over ranks), and its seconds go to ``synth_seconds``."""

    def __init__(self, method: Synthesizer, ranks: Any, batch_size: int, counters: Counters):
        self.method, self.ranks, self.batch_size, self.counters = method, ranks, batch_size, counters
        self.last: torch.Tensor | None = None  # the last batch, for samples.png

    def add(self, batch: SynthBatch, keep_labels: bool) -> None:
        """A round of a fresh method trains its generator; it hands over no images to pool."""

    def next(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        with self.counters.timing("synth_seconds"), sealed(), torch.no_grad():
            batch = self.method.sample(self.batch_size)
            images, passes, bad = self.ranks.total(0 if batch.reused else len(batch.images),
                                                   batch.teacher_passes, int(not torch.isfinite(batch.images).all()))
        if bad:
            raise NonFiniteError("the synthesizer produced non-finite images")
        self.counters.images += images
        self.counters.teacher_passes += passes
        self.last = batch.images
        return batch.images, batch.labels

    def samples(self) -> torch.Tensor | None:
        return quantize(self.last[-64:]) if self.last is not None else None

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


def batch_source(method_cls: type[Synthesizer], method: Synthesizer, pool: SamplePool, ranks: Any, batch_size: int,
                 counters: Counters, seed: int) -> PoolBatches | FreshBatches:
    """The source ``method_cls.batch_source`` names; a pool's passes are drawn from a generator seeded with
    ``seed``; a real-data baseline's pool (``real_data_split``) is not synthetic."""
    if method_cls.batch_source == "fresh":
        return FreshBatches(method, ranks, batch_size, counters)
    sampler = torch.Generator().manual_seed(seed)
    return PoolBatches(pool, ranks.pass_sampler(sampler), sampler, batch_size, method.ctx.device,
                       synthetic=method_cls.real_data_split is None)


__all__ = ["FreshBatches", "PoolBatches", "batch_source"]
