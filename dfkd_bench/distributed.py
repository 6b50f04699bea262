"""One run across processes (torchrun, DistributedDataParallel): the plumbing beside the protocol loop.

The runner asks :func:`for_run` for its ranks. One process gets :class:`SingleProcess`, whose methods
hand their input back unchanged, so a single-process run executes exactly the code it always did.
In a process group (``torchrun --nproc_per_node=N -m dfkd_bench run ...`` or ``dfkd-bench run --ddp N``)
it gets :class:`DataParallel`:

- ``batch_size`` and ``synth_batch_size`` stay the global sizes: each rank synthesizes its share of a
  round's images from its own seed stream, and the shares are all-gathered in rank order, so every
  rank adds the same batch to the same pool;
- each student step takes one global batch from that pool, split across the ranks as
  ``DistributedSampler`` splits a dataset, and the step is ``DistributedDataParallel``;
- logged loss terms are averaged over ranks, budgets follow rank 0, evaluation is sharded;
- only rank 0 touches the run folder; the other ranks receive what it read, and any error it raised.
  The checkpoint holds every rank's method state and RNG streams, so a restart resumes every rank.
"""

from __future__ import annotations

import contextlib
import datetime
import io
import math
import os
import socket
from typing import Any, Callable, Iterator

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn

from .data import ImageSplit, Normalizer, count_correct, evaluate
from .errors import DfkdError
from .losses import sync_bn_statistics
from .method import SynthBatch
from .pool import PassSampler, SamplePool
from .runtime import seed_everything, select_device


class SingleProcess:
    """The ranks of a run in one process: every method is the identity."""

    rank, world, main = 0, 1, True

    def device(self, device: torch.device) -> torch.device:
        """The device this rank computes on."""
        return device

    def folder(self, folder: Any) -> Any:
        """The run folder as this rank sees it."""
        return folder

    def share(self, size: int, name: str) -> int:
        """This rank's part of a global batch size."""
        return size

    def seed(self, seed: int) -> None:
        """Give each rank its own random stream (after every rank built the same models)."""

    def wrap(self, module: nn.Module) -> nn.Module:
        """The module that takes the student's gradient steps."""
        return module

    def pass_sampler(self, generator: torch.Generator) -> PassSampler:
        """The student's batches from the pool."""
        return PassSampler(generator)

    def sync_bn_statistics(self, model: nn.Module) -> None:
        """Make the BN-statistics losses on ``model`` use the global batch (one process: it already does)."""

    def gather(self, batch: SynthBatch) -> SynthBatch:
        """The round's batch from every rank's share."""
        return batch

    def mean(self, values: list[torch.Tensor | float]) -> list[float]:
        """Scalars as floats, averaged over ranks."""
        return [_scalar(v) for v in values]

    def total(self, *counts: int) -> tuple[int, ...]:
        """Counts summed over ranks."""
        return counts

    def agree(self, value: Any) -> Any:
        """Rank 0's ``value`` on every rank (decisions that must not differ between ranks)."""
        return value

    def sync_buffers(self, module: nn.Module) -> None:
        """Give every rank rank 0's buffers (BatchNorm running statistics)."""

    def evaluate(self, model: nn.Module, split: ImageSplit, normalizer: Normalizer, device: torch.device,
                 batch_size: int) -> float:
        """Test accuracy in percent."""
        return evaluate(model, split, None, normalizer, device, batch_size)

    def rank_states(self, **state: Any) -> dict[str, Any]:
        """Checkpoint entries that hold every rank's own ``state`` (on rank 0)."""
        return {}

    def own_state(self, checkpoint: dict[str, Any]) -> dict[str, Any]:
        """This rank's entries of ``checkpoint``; refuses a checkpoint written by another number of ranks."""
        saved = checkpoint.get("world_size", 1)
        if saved != self.world:
            raise DfkdError(f"the checkpoint was written by {saved} process(es), this run has {self.world}: "
                            f"resume it with {saved}")
        return checkpoint if self.world == 1 else checkpoint["ranks"][self.rank]

    def summary(self, cfg: Any) -> dict[str, Any]:
        """What the run summary records about the ranks."""
        return {"world_size": self.world, "global_batch_size": cfg.batch_size,
                "global_synth_batch_size": cfg.synth_batch_size}


class DataParallel(SingleProcess):
    """The ranks of a run in a process group (gloo on CPU, NCCL on CUDA)."""

    def __init__(self) -> None:
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.main = self.rank == 0
        self.local_rank = int(os.environ.get("LOCAL_RANK", self.rank))
        self._device = torch.device("cpu")  # where small collective tensors live (NCCL needs CUDA ones)

    def device(self, device: torch.device) -> torch.device:
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", self.local_rank)
        self._device = device
        return device

    def folder(self, folder: Any) -> Any:
        return RankZeroFolder(folder, self)

    def share(self, size: int, name: str) -> int:
        if size % self.world:
            raise DfkdError(f"{name} ({size}) must be a multiple of the number of processes ({self.world}): "
                            "it is the global size, split evenly across them")
        return size // self.world

    def seed(self, seed: int) -> None:
        # independent streams per (seed, rank): no rank repeats another's, nor another seed's
        seed_everything(int(np.random.SeedSequence([seed, self.rank]).generate_state(1)[0]))

    def wrap(self, module: nn.Module) -> nn.Module:
        # static_graph: the same parameters take part in every step, but not necessarily all of them
        # (a loss with an unused head); device_ids=None: the module and its inputs are already in place
        return nn.parallel.DistributedDataParallel(module, device_ids=None, static_graph=True)

    def pass_sampler(self, generator: torch.Generator) -> PassSampler:
        return ShardedPassSampler(generator, self.rank, self.world)

    def sync_bn_statistics(self, model: nn.Module) -> None:
        sync_bn_statistics(model)

    def gather(self, batch: SynthBatch) -> SynthBatch:
        images = self._all_gather(batch.images.detach())
        labels = None if batch.labels is None else self._all_gather(batch.labels.detach())
        losses = dict(zip(batch.losses, self.mean(list(batch.losses.values()))))
        (passes,) = self.total(batch.teacher_passes)
        return SynthBatch(images, labels, losses, batch.loss_curve, passes)

    def _all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """Every rank's ``tensor`` concatenated in rank order (their first dimensions may differ)."""
        sizes = [torch.zeros(1, dtype=torch.long, device=tensor.device) for _ in range(self.world)]
        dist.all_gather(sizes, torch.tensor([len(tensor)], device=tensor.device))
        sizes = [int(s) for s in sizes]
        if max(sizes) == 0:
            return tensor
        padded = tensor.new_zeros((max(sizes), *tensor.shape[1:]))
        padded[:len(tensor)] = tensor
        parts = [torch.empty_like(padded) for _ in range(self.world)]
        dist.all_gather(parts, padded.contiguous())
        return torch.cat([part[:n] for part, n in zip(parts, sizes)])

    def mean(self, values: list[torch.Tensor | float]) -> list[float]:
        if not values:
            return []
        stacked = torch.tensor([_scalar(v) for v in values], dtype=torch.float64, device=self._device)
        dist.all_reduce(stacked)
        return (stacked / self.world).tolist()

    def total(self, *counts: int) -> tuple[int, ...]:
        summed = torch.tensor(counts, dtype=torch.long, device=self._device)
        dist.all_reduce(summed)
        return tuple(summed.tolist())

    def agree(self, value: Any) -> Any:
        box = [_dumps(value) if self.main else None]
        dist.broadcast_object_list(box, src=0)
        return _loads(box[0])

    def sync_buffers(self, module: nn.Module) -> None:
        for buffer in module.buffers():
            dist.broadcast(buffer, src=0)

    def evaluate(self, model: nn.Module, split: ImageSplit, normalizer: Normalizer, device: torch.device,
                 batch_size: int) -> float:
        correct, _ = count_correct(model, split, normalizer, device, batch_size, self.rank, self.world)
        (correct,) = self.total(correct)
        return 100.0 * correct / max(1, len(split))

    def rank_states(self, **state: Any) -> dict[str, Any]:
        gathered = [None] * self.world if self.main else None
        dist.gather_object(_dumps(state), gathered, dst=0)
        return {"world_size": self.world, "ranks": [_loads(b) for b in gathered]} if self.main else {}


class ShardedPassSampler(PassSampler):
    """Shuffled passes over the pool, each rank taking its shard, as ``DistributedSampler`` does: every rank
    draws the same permutation (same generator), pads it to a multiple of the world size by wrapping around,
    and keeps every ``world``-th index from its rank on. Batch ``k`` of all ranks together is global batch ``k``."""

    def __init__(self, generator: torch.Generator, rank: int, world: int):
        super().__init__(generator)
        self.rank, self.world = rank, world

    def next_batch(self, pool: SamplePool, batch_size: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        if not len(pool):
            raise RuntimeError("the pool is empty")
        if not self._batches:
            order = torch.randperm(len(pool), generator=self.generator)
            total = -(-len(order) // self.world) * self.world  # rounded up to a multiple of the world size
            padded = order.repeat(-(-total // len(order)))[:total]
            self._batches = list(reversed(padded[self.rank::self.world].contiguous().split(batch_size)))
        return pool.gather(self._batches.pop())


class RankZeroFolder:
    """The run folder as every rank sees it: rank 0 calls the folder's methods, the others get its results,
    and a user error raised on rank 0 is raised on every rank (so no rank waits for one that has stopped)."""

    def __init__(self, folder: Any, ranks: DataParallel):
        self._folder, self._ranks = folder, ranks

    def __getattr__(self, name: str) -> Callable[..., Any]:
        method = getattr(self._folder, name)

        def on_rank_zero(*args: Any, **kwargs: Any) -> Any:
            outcome = None
            if self._ranks.main:
                try:
                    outcome = ("ok", method(*args, **kwargs))
                except DfkdError as exc:
                    outcome = ("error", str(exc))
                except BaseException as exc:
                    self._ranks.agree(("crash", f"{type(exc).__name__}: {exc}"))
                    raise
            kind, value = self._ranks.agree(outcome)
            if kind == "error":
                raise DfkdError(value)
            if kind == "crash":
                raise RuntimeError(f"rank 0 failed in {name}: {value}")
            return value

        return on_rank_zero


def _scalar(value: torch.Tensor | float) -> float:
    return value.item() if isinstance(value, torch.Tensor) else float(value)


# Objects travel between ranks in torch.save's format: plain pickling of some tensors does not
# round-trip (the uint32 key tensor of numpy's RNG state, for one), and this loads onto the CPU.
def _dumps(obj: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _loads(data: bytes) -> Any:
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=False)  # written by a rank of this run


def for_run() -> SingleProcess:
    """The ranks of the run this process takes part in."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return DataParallel()
    return SingleProcess()


def launched_world_size() -> int:
    """The number of processes a launcher (torchrun, ``run --ddp``) started this one among; 1 otherwise."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main_process() -> bool:
    """Whether this process is rank 0 of its process group, or in none (what may print and write)."""
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


#: seconds a collective waits for the other ranks before it fails (torch's default, 30 min for gloo and
#: NCCL, when unset): a rank that never arrives then ends the run instead of hanging it for half an hour
DIST_TIMEOUT_ENV = "DFKD_BENCH_DIST_TIMEOUT"


def dist_timeout() -> datetime.timedelta | None:
    """The collective timeout ``$DFKD_BENCH_DIST_TIMEOUT`` asks for (seconds, > 0); ``None``: torch's default.

    Raises:
        DfkdError: the variable is set to something other than a positive number of seconds.
    """
    raw = os.environ.get(DIST_TIMEOUT_ENV, "").strip()
    if not raw:
        return None
    try:
        seconds = float(raw)
    except ValueError:
        seconds = 0.0
    if not (math.isfinite(seconds) and seconds > 0):
        raise DfkdError(f"${DIST_TIMEOUT_ENV} must be a positive number of seconds, not {raw!r}")
    return datetime.timedelta(seconds=seconds)


@contextlib.contextmanager
def process_group_from_env(device: str | None) -> Iterator[None]:
    """Join the process group that torchrun (or :func:`spawn`) describes in the environment, for the
    duration of the block: gloo on CPU, NCCL on CUDA, with :func:`dist_timeout`. Without ``WORLD_SIZE`` > 1
    it does nothing."""
    if launched_world_size() <= 1 or dist.is_initialized():
        yield
        return
    timeout = dist_timeout()
    cuda = select_device(device or "auto").type == "cuda"
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if cuda else "gloo", **({"timeout": timeout} if timeout else {}))
    try:
        yield
    finally:
        dist.destroy_process_group()


def spawn(nprocs: int, fn: Callable[..., None], *args: Any) -> None:
    """Run ``fn(*args)`` in ``nprocs`` local processes that form one process group, as
    ``torchrun --standalone --nproc_per_node=nprocs`` would. A failing process stops the others;
    its exit code is raised as ``SystemExit``."""
    from torch.multiprocessing import ProcessExitedException, ProcessRaisedException, start_processes

    with socket.socket() as s:  # a free port for the rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    try:
        start_processes(_spawned, args=(nprocs, port, fn, args), nprocs=nprocs, start_method="spawn")
    except ProcessExitedException as exc:
        raise SystemExit(exc.exit_code if exc.exit_code and exc.exit_code > 0 else 1) from None
    except ProcessRaisedException as exc:
        raise RuntimeError(f"a data-parallel process failed:\n{exc}") from None


def _spawned(local_rank: int, nprocs: int, port: int, fn: Callable[..., None], args: tuple) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(local_rank),
                      LOCAL_RANK=str(local_rank), WORLD_SIZE=str(nprocs), LOCAL_WORLD_SIZE=str(nprocs))
    # as torchrun: the cores are shared between the processes unless OMP_NUM_THREADS says otherwise
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "0")) or max(1, (os.cpu_count() or 1) // nprocs))
    fn(*args)
