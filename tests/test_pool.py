"""The synthetic sample pool: contents, labels, sampling, spill to disk, checkpoint round trip."""

from __future__ import annotations

import io

import pytest
import torch

from dfkd_bench.pool import PassSampler, SamplePool, quantize

SHAPE = (3, 4, 4)


def _batches(n_batches: int, size: int, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """uint8 batches whose labels are the images' global indices, so any sample can be checked."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for b in range(n_batches):
        images = torch.randint(0, 256, (size, *SHAPE), generator=g, dtype=torch.uint8)
        out.append((images, torch.arange(b * size, (b + 1) * size)))
    return out


def _fill(pool: SamplePool, batches) -> tuple[torch.Tensor, torch.Tensor]:
    for images, labels in batches:
        pool.add(images, labels)
    return torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])


def test_add_keeps_images_and_labels_in_order():
    pool = SamplePool()
    images, labels = _fill(pool, _batches(3, 5))
    assert len(pool) == 15 and pool.has_labels
    all_images, all_labels = pool.tensors()
    assert torch.equal(all_images, images) and torch.equal(all_labels, labels)
    got, got_labels = pool.gather(torch.tensor([14, 0, 7, 7]))
    assert torch.equal(got, images[[14, 0, 7, 7]]) and got_labels.tolist() == [14, 0, 7, 7]
    assert torch.equal(pool.last(4), images[-4:])


def test_float_images_are_quantized_to_uint8():
    pixels = torch.randint(0, 256, (6, *SHAPE), dtype=torch.uint8)
    pool = SamplePool()
    pool.add(pixels.float() / 255.0)  # exact multiples of 1/255 come back exactly
    pool.add(torch.tensor([-0.5, 1.7]).view(2, 1, 1, 1).expand(2, *SHAPE))  # out-of-range values are clamped
    images, labels = pool.tensors()
    assert images.dtype == torch.uint8 and labels is None and not pool.has_labels
    assert torch.equal(images[:6], pixels)
    assert images[6].unique().tolist() == [0] and images[7].unique().tolist() == [255]
    assert torch.equal(quantize(torch.tensor([0.0, 0.4 / 255, 0.6 / 255, 1.0])), torch.tensor([0, 0, 1, 255],
                                                                                             dtype=torch.uint8))


def test_a_pass_draws_every_image_once_and_ends_with_a_short_batch():
    pool = SamplePool()
    images, _ = _fill(pool, _batches(4, 8))  # 32 images, labels 0..31
    sampler = PassSampler(torch.Generator().manual_seed(3))
    batches = [sampler.next_batch(pool, 10) for _ in range(4)]
    assert [len(b[0]) for b in batches] == [10, 10, 10, 2]  # drop_last=False, as the reference loaders
    drawn = torch.cat([labels for _, labels in batches])
    assert sorted(drawn.tolist()) == list(range(32))  # each image exactly once, old chunks included
    for batch, labels in batches:
        assert batch.dtype == torch.uint8 and torch.equal(batch, images[labels])  # images travel with labels
    assert len(sampler.next_batch(pool, 10)[0]) == 10  # a used-up pass starts the next one


def test_restart_begins_a_new_pass_over_the_grown_pool():
    pool = SamplePool()
    _fill(pool, _batches(2, 8))  # labels 0..15
    sampler = PassSampler(torch.Generator().manual_seed(0))
    sampler.next_batch(pool, 4)  # a pass is under way
    new_images, _ = _batches(1, 8, seed=5)[0]
    pool.add(new_images, torch.arange(16, 24))
    sampler.restart()
    drawn = torch.cat([sampler.next_batch(pool, 4)[1] for _ in range(6)])
    assert sorted(drawn.tolist()) == list(range(24))  # one whole pass over the grown pool, new images included


def test_passes_are_reproducible_with_a_seeded_generator():
    pool = SamplePool()
    _fill(pool, _batches(3, 6))
    a = PassSampler(torch.Generator().manual_seed(11)).next_batch(pool, 5)
    b = PassSampler(torch.Generator().manual_seed(11)).next_batch(pool, 5)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_pool_errors():
    pool = SamplePool()
    with pytest.raises(RuntimeError, match="empty"):
        PassSampler(torch.Generator()).next_batch(pool, 4)
    with pytest.raises(ValueError, match="labels"):
        pool.add(torch.zeros(3, *SHAPE, dtype=torch.uint8), torch.arange(2))


def test_spill_to_disk_keeps_contents_identical(tmp_path):
    batches = _batches(6, 4)
    spilled = SamplePool(max_in_memory=6, spill_dir=tmp_path)
    in_memory = SamplePool()
    images, labels = _fill(spilled, batches)
    _fill(in_memory, batches)
    files = sorted(tmp_path.glob("chunk_*.pt"))
    # 24 images, at most 6 in memory: at least 18 of them (5 chunks of 4) live on disk
    assert len(files) >= 5
    on_disk = [torch.load(f, weights_only=True) for f in files]
    for f, chunk in zip(files, on_disk):
        index = int(f.stem.split("_")[1])
        assert torch.equal(chunk["images"], batches[index][0]) and torch.equal(chunk["labels"], batches[index][1])
    all_images, all_labels = spilled.tensors()
    assert torch.equal(all_images, images) and torch.equal(all_labels, labels)
    idx = torch.tensor([0, 5, 23, 12, 3])
    assert torch.equal(spilled.gather(idx)[0], images[idx])
    for seed in range(3):
        a = PassSampler(torch.Generator().manual_seed(seed)).next_batch(spilled, 7)
        b = PassSampler(torch.Generator().manual_seed(seed)).next_batch(in_memory, 7)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
        assert torch.equal(a[0], images[a[1]])


def test_spill_needs_a_folder():
    pool = SamplePool(max_in_memory=2, spill_dir=None)
    images, _ = _fill(pool, _batches(3, 4))
    assert torch.equal(pool.tensors()[0], images)


@pytest.mark.parametrize("with_labels", [True, False])
def test_state_dict_round_trip_through_a_weights_only_checkpoint(tmp_path, with_labels):
    pool = SamplePool(max_in_memory=5, spill_dir=tmp_path / "a")
    batches = _batches(4, 3)
    for images, labels in batches:
        pool.add(images, labels if with_labels else None)
    buf = io.BytesIO()
    torch.save(pool.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    assert state["chunks"] == [3, 3, 3, 3]
    restored = SamplePool(max_in_memory=5, spill_dir=tmp_path / "b")
    restored.load_state_dict(state)
    assert len(restored) == len(pool) == 12
    assert restored.has_labels == with_labels
    a_images, a_labels = pool.tensors()
    b_images, b_labels = restored.tensors()
    assert torch.equal(a_images, b_images)
    assert (a_labels is None and b_labels is None) or torch.equal(a_labels, b_labels)
    assert restored.state_dict()["chunks"] == state["chunks"]
    x = PassSampler(torch.Generator().manual_seed(5)).next_batch(pool, 6)[0]
    y = PassSampler(torch.Generator().manual_seed(5)).next_batch(restored, 6)[0]
    assert torch.equal(x, y)


def test_load_state_dict_replaces_previous_contents():
    source = SamplePool()
    _fill(source, _batches(2, 3, seed=1))
    target = SamplePool()
    _fill(target, _batches(5, 3, seed=2))
    target.load_state_dict(source.state_dict())
    assert len(target) == 6
    assert torch.equal(target.tensors()[0], source.tensors()[0])
