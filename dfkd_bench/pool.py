"""The synthetic sample pool: every synthesized batch, kept as tensors.

Images are stored as uint8 (what the reference code's PNG files hold, a quarter of the
memory of float32) in chunks, one per round. Beyond ``max_in_memory`` images, the oldest
chunks are written to ``spill_dir`` and memory-mapped back, so a long run's pool costs
disk, not RAM. :class:`PassSampler` draws the student's batches from it.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .runtime import atomic_torch_save


def quantize(images: torch.Tensor) -> torch.Tensor:
    """[0, 1] floats -> uint8 (rounded)."""
    return images.detach().clamp(0, 1).mul(255).round().to(torch.uint8).cpu()


class SamplePool:
    def __init__(self, max_in_memory: int = 0, spill_dir: Path | None = None):
        self.max_in_memory = max_in_memory
        self.spill_dir = Path(spill_dir) if spill_dir else None
        self._images: list[torch.Tensor] = []
        self._labels: list[torch.Tensor | None] = []
        self._spilled: list[bool] = []
        self._offsets = torch.zeros(1, dtype=torch.long)

    def __len__(self) -> int:
        return int(self._offsets[-1])

    @property
    def has_labels(self) -> bool:
        return bool(self._labels) and all(lbl is not None for lbl in self._labels)

    def add(self, images: torch.Tensor, labels: torch.Tensor | None = None) -> None:
        """Add a batch of [0, 1] images (float) or uint8 images, with optional int labels."""
        imgs = images.cpu() if images.dtype == torch.uint8 else quantize(images)
        if labels is not None and len(labels) != len(imgs):
            raise ValueError(f"{len(labels)} labels for {len(imgs)} images")
        self._images.append(imgs.contiguous())
        self._labels.append(None if labels is None else labels.detach().long().cpu())
        self._spilled.append(False)
        self._offsets = torch.cat([self._offsets, self._offsets[-1:] + len(imgs)])
        self._maybe_spill()

    def _maybe_spill(self) -> None:
        if not self.max_in_memory or self.spill_dir is None:
            return
        in_memory = sum(len(x) for x, s in zip(self._images, self._spilled) if not s)
        for i, spilled in enumerate(self._spilled):
            if in_memory <= self.max_in_memory:
                break
            if spilled:
                continue
            path = self.spill_dir / f"chunk_{i:06d}.pt"
            atomic_torch_save(path, {"images": self._images[i], "labels": self._labels[i]})
            data = torch.load(path, mmap=True, weights_only=True)
            in_memory -= len(self._images[i])
            self._images[i], self._labels[i], self._spilled[i] = data["images"], data["labels"], True

    def gather(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        chunk = torch.searchsorted(self._offsets, idx, right=True) - 1
        images = torch.empty((len(idx), *self._images[0].shape[1:]), dtype=torch.uint8)
        labels = torch.empty(len(idx), dtype=torch.long) if self.has_labels else None
        for c in chunk.unique().tolist():
            sel = (chunk == c).nonzero().flatten()
            local = idx[sel] - self._offsets[c]
            images[sel] = self._images[c][local]
            if labels is not None:
                labels[sel] = self._labels[c][local]
        return images, labels

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """All images (and labels) as two tensors."""
        images = torch.cat(self._images) if self._images else torch.empty(0, dtype=torch.uint8)
        labels = torch.cat(self._labels) if self.has_labels else None
        return images, labels

    def last(self, n: int) -> torch.Tensor:
        """The ``n`` most recently added images (for sample grids)."""
        images, _ = self.gather(torch.arange(max(0, len(self) - n), len(self)))
        return images

    def state_dict(self) -> dict:
        images, labels = self.tensors()
        return {"images": images, "labels": labels, "chunks": [len(x) for x in self._images]}

    def load_state_dict(self, state: dict) -> None:
        self.__init__(self.max_in_memory, self.spill_dir)
        images, labels = state["images"], state["labels"]
        start = 0
        for size in state["chunks"]:
            self.add(images[start:start + size], None if labels is None else labels[start:start + size])
            start += size


class PassSampler:
    """The student's batches: shuffled passes over the whole pool, restarted after every synthesis round.

    This is what the reference code (CMI, Fast, CSD) does: each round rebuilds a
    ``DataLoader(pool, shuffle=True)`` and iterates it, starting a new pass when one is used up,
    so within a pass every image is drawn exactly once and the last batch of a pass may be short.
    The permutations come from ``generator`` (checkpointed by the runner); a pass never spans a
    checkpoint, because checkpoints fall between rounds.
    """

    def __init__(self, generator: torch.Generator):
        self.generator = generator
        self._batches: list[torch.Tensor] = []

    def restart(self) -> None:
        """Start a new pass at the next draw (call after the pool changed)."""
        self._batches = []

    def next_batch(self, pool: SamplePool, batch_size: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The next batch of the current pass: uint8 images and their labels (or None)."""
        if not len(pool):
            raise RuntimeError("the pool is empty")
        if not self._batches:
            order = torch.randperm(len(pool), generator=self.generator)
            self._batches = list(reversed(order.split(batch_size)))
        return pool.gather(self._batches.pop())
