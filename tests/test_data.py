"""Datasets: the offline Fashion-MNIST reader, IDX parsing, and the guard that keeps real data from methods."""

from __future__ import annotations

import dataclasses
import gzip
import struct
from dataclasses import dataclass

import pytest
import torch
import torch.nn as nn
from helpers import TINY, TINY_CLASSES, TINY_SHAPE, tiny_runner

from dfkd_bench.data import DEBIAN_FASHION_MNIST, DatasetSpec, get_dataset, read_idx, sealed
from dfkd_bench.errors import DataAccessError, DfkdError
from dfkd_bench.method import SynthBatch, SynthContext, Synthesizer

# ---------------------------------------------------------------- Fashion-MNIST


@pytest.mark.skipif(not DEBIAN_FASHION_MNIST.is_dir(),
                    reason=f"Debian's Fashion-MNIST ({DEBIAN_FASHION_MNIST}) is not installed")
@pytest.mark.parametrize("split,count", [("train", 60000), ("test", 10000)])
def test_fashion_mnist_reads_the_debian_files(split, count, tmp_path, monkeypatch):
    monkeypatch.setenv("DFKD_BENCH_DATA", str(tmp_path))  # nothing to find or download here
    spec = get_dataset("fashion-mnist")
    assert spec.image_shape == (1, 28, 28) and spec.num_classes == 10
    images, labels = spec.load(split)
    assert images.shape == (count, 1, 28, 28)
    assert images.dtype == torch.uint8
    assert labels.shape == (count,) and labels.dtype == torch.int64
    assert labels.min().item() == 0 and labels.max().item() == 9
    assert torch.bincount(labels, minlength=10).tolist() == [count // 10] * 10  # Fashion-MNIST is balanced
    assert images.max().item() == 255 and images.min().item() == 0
    assert not list(tmp_path.iterdir())  # read in place, nothing downloaded


def test_unknown_split_is_rejected():
    with pytest.raises(ValueError, match="split"):
        get_dataset(TINY).load("validation")


# ---------------------------------------------------------------- IDX files


def _idx_bytes(data: torch.Tensor) -> bytes:
    header = bytes([0, 0, 0x08, data.ndim]) + struct.pack(f">{data.ndim}I", *data.shape)
    return header + data.numpy().tobytes()


@pytest.mark.parametrize("compressed", [False, True])
def test_read_idx_round_trip(tmp_path, compressed):
    data = torch.randint(0, 256, (3, 4, 5), dtype=torch.uint8)
    raw = _idx_bytes(data)
    path = tmp_path / ("x.idx.gz" if compressed else "x.idx")
    path.write_bytes(gzip.compress(raw) if compressed else raw)
    assert torch.equal(read_idx(path), data)


def test_read_idx_rejects_a_truncated_body(tmp_path):
    path = tmp_path / "cut.idx"
    path.write_bytes(_idx_bytes(torch.zeros(10, 4, dtype=torch.uint8))[:-7])
    with pytest.raises(DfkdError, match="truncated"):
        read_idx(path)


def test_read_idx_rejects_a_truncated_gzip_stream(tmp_path):
    path = tmp_path / "cut.idx.gz"
    packed = gzip.compress(_idx_bytes(torch.randint(0, 256, (50, 50), dtype=torch.uint8)))
    path.write_bytes(packed[: len(packed) // 2])
    with pytest.raises(DfkdError, match="cannot read"):
        read_idx(path)


@pytest.mark.parametrize("content,name", [
    (b"hello, I am a text file, not an IDX file\n", "notes.idx"),
    (b"", "empty.idx"),
    (bytes([0, 0, 0x0D, 1, 0, 0, 0, 1]) + b"\0\0\0\0", "floats.idx"),  # IDX of float32, not of bytes
    (b"plain bytes behind a .gz name", "fake.idx.gz"),
])
def test_read_idx_rejects_files_that_are_not_idx(tmp_path, content, name):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(DfkdError):
        read_idx(path)


def test_read_idx_rejects_a_file_cut_inside_the_header(tmp_path):
    path = tmp_path / "header.idx"
    path.write_bytes(_idx_bytes(torch.zeros(2, 3, 4, dtype=torch.uint8))[:9])
    with pytest.raises(DfkdError):
        read_idx(path)


def test_missing_idx_file_is_a_user_error(tmp_path):
    with pytest.raises(DfkdError, match="cannot read"):
        read_idx(tmp_path / "absent.idx")


# ---------------------------------------------------------------- the sealed guard


def test_sealed_blocks_every_real_data_load_and_is_reentrant():
    spec = get_dataset(TINY)
    with sealed():
        with pytest.raises(DataAccessError, match="tiny/train"):
            spec.load("train")
        with sealed():
            pass
        with pytest.raises(DataAccessError, match="tiny/test"):
            spec.load("test")  # still sealed after the inner block ends
    images, labels = spec.load("train")  # unsealed again
    assert images.shape[1:] == TINY_SHAPE and labels.max().item() == TINY_CLASSES - 1


def test_sealed_is_released_when_its_block_raises():
    with pytest.raises(ZeroDivisionError):
        with sealed():
            1 / 0
    get_dataset(TINY).load("test")


def test_sealed_applies_to_every_dataset_spec():
    calls = []
    spec = DatasetSpec("probe", 2, 1, 4, (0.5,), (0.5,), lambda split, root: calls.append(split))
    with sealed(), pytest.raises(DataAccessError):
        spec.load("train")
    assert calls == []  # the loader never ran


# ---------------------------------------------------------------- what a method can reach


@dataclass
class _EmptyConfig:
    pass


class _ToyMethod(Synthesizer):
    """Uniform noise images; subclasses try to reach real data at various points."""

    summary = "test-only method"
    Config = _EmptyConfig
    seen: list[SynthContext] = []

    def __init__(self, ctx, cfg):
        super().__init__(ctx, cfg)
        type(self).seen.append(ctx)

    def synthesize(self) -> SynthBatch:
        n = self.ctx.synth_batch_size
        return SynthBatch(torch.rand(n, *self.ctx.image_shape), teacher_passes=n, losses={"total": 0.0})


def _peek():
    return get_dataset(TINY).load("train")


class _PeekInSynthesize(_ToyMethod):
    name = "test_peek_synthesize"

    def synthesize(self):
        _peek()
        return super().synthesize()


class _PeekInInit(_ToyMethod):
    name = "test_peek_init"

    def __init__(self, ctx, cfg):
        super().__init__(ctx, cfg)
        _peek()


class _PeekAfterStudentStep(_ToyMethod):
    name = "test_peek_after_step"

    def after_student_step(self, x, y):
        _peek()
        return {}


class _PeekOnEpochStart(_ToyMethod):
    name = "test_peek_epoch_start"

    def on_epoch_start(self, epoch, warmup):
        _peek()


class _Honest(_ToyMethod):
    name = "test_honest"


@pytest.mark.parametrize("cls", [_PeekInSynthesize, _PeekAfterStudentStep], ids=["synthesize", "after_step"])
def test_a_method_cannot_reach_real_data_during_a_run(cls, register_toy, tiny_store, tmp_path):
    runner = tiny_runner(register_toy(cls), tmp_path / "run", tiny_store)
    with pytest.raises(DataAccessError, match="tiny/train"):
        runner.run()


def test_a_method_cannot_reach_real_data_when_it_is_built(register_toy, tiny_store, tmp_path):
    with pytest.raises(DataAccessError, match="tiny/train"):
        tiny_runner(register_toy(_PeekInInit), tmp_path / "run", tiny_store)


def test_a_method_cannot_reach_real_data_at_epoch_start(register_toy, tiny_store, tmp_path):
    runner = tiny_runner(register_toy(_PeekOnEpochStart), tmp_path / "run", tiny_store)
    with pytest.raises(DataAccessError):
        runner.run()


def test_the_context_a_method_gets_holds_no_dataset(register_toy, tiny_store, tmp_path):
    _ToyMethod.seen.clear()
    runner = tiny_runner(register_toy(_Honest), tmp_path / "run", tiny_store)
    assert runner.run()["status"] == "complete"
    assert len(_ToyMethod.seen) == 1
    ctx = _ToyMethod.seen[0]
    assert {f.name for f in dataclasses.fields(ctx)} == {
        "teacher", "student", "image_shape", "num_classes", "normalizer", "device", "synth_batch_size", "amp",
        "class_names", "lr", "warmup_epochs", "student_lr", "amp_dtype", "epochs", "temperature"}
    assert (ctx.epochs, ctx.temperature) == (runner.cfg.epochs, runner.cfg.temperature)  # the run's, not defaults
    assert ctx.image_shape == TINY_SHAPE and ctx.num_classes == TINY_CLASSES
    assert ctx.teacher is runner.teacher and ctx.student is runner.student
    assert not any(isinstance(v, torch.Tensor) for v in vars(ctx).values())
    assert not any(isinstance(v, DatasetSpec) for v in vars(ctx).values())
    # every tensor reachable through the context: model weights and the normalizer's mean/std only
    reachable = [t for v in vars(ctx).values() if isinstance(v, nn.Module)
                 for t in list(v.parameters()) + list(v.buffers())]
    dataset_ptrs = {runner.test.images.data_ptr(), runner.test.labels.data_ptr()}
    assert all(t.data_ptr() not in dataset_ptrs for t in reachable)
    assert sorted(name for name, _ in ctx.normalizer.named_buffers()) == ["mean", "std"]
    # the runner's own test split exists, the method simply has no handle on it
    assert isinstance(runner.test.images, torch.Tensor) and not hasattr(runner.method, "test")


def test_idx_header_helper_matches_the_reader(tmp_path):
    # guards the helper the IDX tests above rely on
    data = torch.arange(6, dtype=torch.uint8).view(2, 3)
    assert _idx_bytes(data)[:12] == bytes([0, 0, 8, 2, 0, 0, 0, 2, 0, 0, 0, 3])
    (tmp_path / "ok").write_bytes(_idx_bytes(data))
    assert read_idx(tmp_path / "ok").tolist() == [[0, 1, 2], [3, 4, 5]]
