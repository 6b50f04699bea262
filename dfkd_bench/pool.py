"""The synthetic sample pool: every synthesized batch, kept as tensors.

Images are stored as uint8 (what the reference code's PNG files hold, a quarter of the
memory of float32) in chunks, one per round. Beyond ``max_in_memory`` images, the oldest
chunks are written to ``spill_dir`` and memory-mapped back, so a long run's pool costs
disk, not RAM. Sampling is uniform over all images ever added.
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

    def sample(self, batch_size: int, generator: torch.Generator | None = None
               ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """A uniform random batch (with replacement across batches, without within one): uint8 images, labels."""
        n = len(self)
        if n == 0:
            raise RuntimeError("the pool is empty")
        idx = torch.randperm(n, generator=generator)[:batch_size] if n <= 1 << 24 else \
            torch.randint(n, (batch_size,), generator=generator)
        return self.gather(idx)

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
