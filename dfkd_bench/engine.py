"""The shared protocol: synthesize -> pool -> distill -> evaluate, the same for every method.

    for epoch in range(epochs):
        for round in range(ep_steps // kd_steps):
            batch = method.synthesize()              # sealed: no real data reachable
            pool.add(batch)
            for step in range(kd_steps):             # skipped in warm-up epochs
                x = augment(pool batch)              # shuffled passes over the pool, or a fresh batch
                student step on loss(student(x), teacher(x))
        evaluate on the real test set; append metrics; checkpoint

``Runner.run`` and the three methods under it (``_run_epoch``, ``_synthesize``, ``_distill_step``)
are that loop. Building the components is ``__init__``; the run folder, checkpoints and budgets
live in :mod:`dfkd_bench.rundir`.
"""

from __future__ import annotations

import copy
import math
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.nn as nn

from . import distributed
from .augment import crop_flip
from .config import RunConfig
from .data import DatasetSpec, Normalizer, get_dataset, sealed, to_unit
from .errors import DfkdError
from .losses import NoBatchNormError
from .method import DistillLoss, LossContext, Outputs, SynthContext, Synthesizer
from .pool import SamplePool, quantize
from .registry import LOSSES, SYNTHESIZERS
from .rundir import CHECKPOINT, POOL, Counters, RunFolder, budget_reached, timestamp
from .runtime import (
    device_name,
    git_commit,
    rng_state,
    safe_load,
    seed_everything,
    select_device,
    set_rng_state,
    versions,
)
from .teachers import load_teacher
from .zoo import create_model


class Reporter(Protocol):
    """What the runner tells the outside world (the CLI draws a rich progress bar from it)."""

    def start(self, total_rounds: int, done_rounds: int, description: str) -> None: ...
    def round_done(self, epoch: int, round_: int, terms: dict[str, float]) -> None: ...
    def epoch_done(self, record: dict[str, Any]) -> None: ...
    def message(self, text: str) -> None: ...


class SilentReporter:
    def start(self, total_rounds: int, done_rounds: int, description: str) -> None:
        pass

    def round_done(self, epoch: int, round_: int, terms: dict[str, float]) -> None:
        pass

    def epoch_done(self, record: dict[str, Any]) -> None:
        pass

    def message(self, text: str) -> None:
        pass


class NonFiniteError(RuntimeError):
    pass


def _mean_terms(acc: dict[str, list[float]]) -> dict[str, float]:
    return {k: sum(v) / len(v) for k, v in acc.items() if v}


class StudentLoss(nn.Module):
    """The student's forward pass and the distillation loss as one module: what a student step
    differentiates, so that one DistributedDataParallel wrapper also covers the loss's own parameters."""

    def __init__(self, student: nn.Module, loss_fn: DistillLoss):
        super().__init__()
        self.student, self.loss_fn = student, loss_fn

    def forward(self, x: torch.Tensor, t: Outputs, y: torch.Tensor | None) -> dict[str, torch.Tensor]:
        s_feat = self.student.forward_features(x)
        return self.loss_fn(Outputs(s_feat, self.student.forward_head(s_feat)), t, y)


class Runner:
    """Runs one (method, dataset, teacher, student, seed) under the shared protocol."""

    def __init__(self, cfg: RunConfig, method_cfg: Any, loss_cfg: Any, run_dir: Path,
                 teacher_store: Path | None = None, reporter: Reporter | None = None):
        self.cfg, self.method_cfg, self.loss_cfg = cfg, method_cfg, loss_cfg
        self.run_dir = Path(run_dir)
        self.ranks = distributed.for_run()  # one process, or this rank's view of a data-parallel run
        self.folder = self.ranks.folder(RunFolder(self.run_dir))
        self.reporter = reporter or SilentReporter()
        self.spec: DatasetSpec = get_dataset(cfg.dataset)
        self.device = self.ranks.device(select_device(cfg.device))
        self.rank_batch_size = self.ranks.share(cfg.batch_size, "batch_size")
        # autocast on CUDA; on CPU only when asked (amp_cpu), so the AMP path can be tested without a GPU
        self.amp = cfg.amp and (self.device.type == "cuda" or cfg.amp_cpu)
        self.amp_dtype = getattr(torch, cfg.amp_dtype)
        self.folder.check_config(cfg.to_dict(), defaults=RunConfig().to_dict())
        seed_everything(cfg.seed)
        spec = self.spec
        self.teacher, self.teacher_meta = load_teacher(spec, cfg.teacher, teacher_store,
                                                       Path(cfg.teacher_checkpoint) if cfg.teacher_checkpoint else None)
        self.teacher.to(self.device)
        method_cls = SYNTHESIZERS.get(cfg.method)
        if method_cls.student_is_teacher:
            self.student = copy.deepcopy(self.teacher).requires_grad_(True)
            self.student.dfkd_name = self.teacher_meta.get("arch")
        else:
            self.student = create_model(cfg.student, spec.num_classes, spec.channels, spec.image_size)
        self.student.to(self.device)
        self.normalizer = Normalizer(spec.mean, spec.std).to(self.device)
        self.test_x, self.test_y = spec.load("test")
        if self.teacher_meta.get("test_accuracy") is None:
            self.teacher_meta["test_accuracy"] = self.ranks.evaluate(self.teacher, self.test_x, self.test_y,
                                                                     self.normalizer, self.device, cfg.eval_batch_size)
        if cfg.sync_bn_stats:
            self.ranks.sync_bn_statistics(self.teacher)
        ctx = SynthContext(self.teacher, self.student, spec.image_shape, spec.num_classes, self.normalizer, self.device,
                           self.ranks.share(cfg.synth_batch_size, "synth_batch_size"), self.amp,
                           class_names=spec.class_names, lr=cfg.lr, warmup_epochs=cfg.warmup_epochs,
                           amp_dtype=self.amp_dtype)
        with sealed():
            try:
                self.method: Synthesizer = method_cls(ctx, method_cfg).to(self.device)
            except NoBatchNormError:
                raise DfkdError(f"method '{cfg.method}' matches the teacher's BatchNorm statistics, but teacher "
                                f"'{cfg.teacher}' ({type(self.teacher).__name__}) has no BatchNorm layer; choose a "
                                "teacher with BatchNorm or a method without a BN-statistics term") from None
        self.loss_fn: DistillLoss = LOSSES.get(cfg.loss)(
            LossContext(self.teacher, self.student, spec.image_shape, spec.num_classes, cfg.temperature),
            loss_cfg).to(self.device)
        if self.loss_fn.needs_labels and not method_cls.uses_labels:
            raise DfkdError(f"loss '{cfg.loss}' needs labels, but method '{cfg.method}' does not keep them")
        params = list(self.student.parameters()) + list(self.loss_fn.parameters())
        self.student_loss = StudentLoss(self.student, self.loss_fn)
        self.params = params
        if cfg.optimizer == "adam":
            self.optimizer = torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        else:
            self.optimizer = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
        kd_epochs = max(1, cfg.epochs - cfg.warmup_epochs)
        if cfg.lr_schedule == "step":  # stepped once per distillation epoch, so milestones count from the warm-up
            self.scheduler = torch.optim.lr_scheduler.MultiStepLR(
                self.optimizer, [m - cfg.warmup_epochs for m in cfg.lr_milestones], gamma=cfg.lr_gamma)
        else:
            self.scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(self.optimizer, T_max=kd_epochs,
                                                                        eta_min=cfg.lr_min)
        # loss scaling only for float16: bfloat16 has float32's exponent range
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp and self.amp_dtype == torch.float16)
        self.augment = crop_flip(spec.image_size).to(self.device) if cfg.kd_augment else nn.Identity()
        self.pool = SamplePool(cfg.pool_in_memory, self.run_dir / "pool_spill" if cfg.pool_in_memory else None)
        self.sampler = torch.Generator().manual_seed(cfg.seed)
        self.batches = self.ranks.pass_sampler(self.sampler)
        self.fresh = method_cls.batch_source == "fresh"
        self.last_fresh: torch.Tensor | None = None  # a "fresh" method's last batch, for samples.png
        self.counters = Counters()
        self.start_epoch = 0
        self.trains_student = not method_cls.student_is_teacher
        self.real_pool = method_cls.real_data_split is not None
        if self.real_pool:
            # a baseline's real data enters through the runner, never through the method
            self.pool.add(*spec.load(method_cls.real_data_split))
        if cfg.init_bank:
            self._load_init_bank(Path(cfg.init_bank))
        if self.trains_student:
            self.student_loss = self.ranks.wrap(self.student_loss)  # DistributedDataParallel across ranks
        self.ranks.seed(cfg.seed)  # every rank built the same models; from here on each draws its own stream
        self.folder.write_config(cfg.to_dict())  # only once every input has been checked: a typo leaves no folder

    # ------------------------------------------------------------ the protocol

    def run(self) -> dict[str, Any]:
        """Run (or continue) the protocol to its end; returns the summary. The folder stays locked to
        this process until then: a second process on it gets a :class:`DfkdError`."""
        self.folder.lock()
        try:
            return self._run()
        finally:
            self.folder.unlock()

    def _run(self) -> dict[str, Any]:
        cfg = self.cfg
        finished = self.folder.finished_summary()
        if finished is not None:
            self.reporter.message(f"{self.run_dir} is already complete")
            return finished
        self.try_resume()
        self._session_start = time.time()
        rounds = cfg.rounds_per_epoch
        self.reporter.start(cfg.epochs * rounds, self.start_epoch * rounds,
                            f"{cfg.method} {cfg.teacher}->{cfg.student} s{cfg.seed}")
        status, reason, epoch = "complete", None, self.start_epoch - 1
        try:
            for epoch in range(self.start_epoch, cfg.epochs):
                reason = self._run_epoch(epoch)
                if reason:
                    status = "budget"
                    break
        except NonFiniteError as exc:
            status, reason = "failed", str(exc)
        self.counters.elapsed += time.time() - self._session_start
        return self._finish(status, reason)

    def _run_epoch(self, epoch: int) -> str | None:
        """One epoch: rounds of synthesis + distillation, then evaluation. Returns the budget that stopped it."""
        cfg = self.cfg
        warmup = epoch < cfg.warmup_epochs
        distill = not (warmup or cfg.synthesis_only)
        terms: dict[str, list[float]] = defaultdict(list)
        self.method.ctx.student_lr = self.optimizer.param_groups[0]["lr"]
        with sealed():
            self.method.on_epoch_start(epoch, warmup)
        stop = None
        for round_ in range(cfg.rounds_per_epoch if self.trains_student else 0):
            self._synthesize(terms)
            if distill:
                t0 = time.time()
                for _ in range(cfg.kd_steps):
                    self._distill_step(terms)
                self.counters.distill_seconds += time.time() - t0
            self._check_weights()
            self.reporter.round_done(epoch, round_, {k: v[-1] for k, v in terms.items() if v})
            stop = self.ranks.agree(budget_reached(cfg, self.counters, time.time() - self._session_start))
            if stop:
                break
        if distill and self.trains_student:
            self.scheduler.step()
        acc = self._evaluate(epoch)
        if stop is None and cfg.max_epochs and epoch + 1 >= cfg.max_epochs < cfg.epochs:
            # the epochs budget stops the schedule `epochs` sets; it never shortens it (that is --set epochs=N)
            stop = f"max_epochs={cfg.max_epochs}"
        self._end_epoch(epoch, warmup, acc, terms, last=epoch == cfg.epochs - 1 or stop is not None)
        return stop

    def _synthesize(self, terms: dict[str, list[float]]) -> None:
        """One synthesis round: the method makes a batch (student frozen), the pool keeps it."""
        self.student.eval().requires_grad_(False)
        t0 = time.time()
        with sealed():
            batch = self.method.synthesize()
        batch = self.ranks.gather(batch)  # every rank's share, so all ranks pool the same images
        self.counters.synth_seconds += time.time() - t0
        if not torch.isfinite(batch.images).all():
            raise NonFiniteError("the synthesizer produced non-finite images")
        if len(batch.images):
            self.pool.add(batch.images, batch.labels if self.method.uses_labels else None)
        self.batches.restart()
        self.counters.images += len(batch.images)
        self.counters.teacher_passes += batch.teacher_passes
        self.counters.rounds += 1
        for k, v in batch.losses.items():
            if not math.isfinite(v):
                raise NonFiniteError(f"synthesis loss term '{k}' is {v}")
            terms[f"synth/{k}"].append(v)
        self.student.train().requires_grad_(True)

    def _distill_step(self, terms: dict[str, list[float]]) -> None:
        """One student step on a batch: loss(student(x), teacher(x)), then the method's hook."""
        if self.fresh:
            images, labels = self._fresh_batch()  # floats in [0, 1], on the device
        else:
            images, labels = self.batches.next_batch(self.pool, self.rank_batch_size)
            images = to_unit(images.to(self.device))
        x = self.normalizer(self.augment(images))
        y = labels.to(self.device) if labels is not None else None
        with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp):
            with torch.no_grad():
                t_feat = self.teacher.forward_features(x)
                t = Outputs(t_feat, self.teacher.forward_head(t_feat))
            parts = self.student_loss(x, t, y)
        loss = sum(parts.values())
        total, *values = self.ranks.mean([loss, *parts.values()])  # over ranks, so all of them stop alike
        if not math.isfinite(total):
            raise NonFiniteError(f"distillation loss is {total} ({', '.join(parts)})")
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if self.cfg.grad_clip > 0:
            self.scaler.unscale_(self.optimizer)  # clip the true gradient, not the scaled one
            nn.utils.clip_grad_norm_(self.params, self.cfg.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        for k, v in zip(parts, values):
            terms[f"kd/{k}"].append(v)
        with sealed():
            extra = self.method.after_student_step(x, y)
        for k, v in zip(extra, self.ranks.mean(list(extra.values()))):
            terms[f"kd/{k}"].append(v)
        self.counters.kd_steps += 1

    def _fresh_batch(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """A "fresh" method's batch for one student step; its time and images count as synthesis."""
        t0 = time.time()
        with sealed(), torch.no_grad():
            batch = self.method.sample(self.rank_batch_size)
        images, passes, bad = self.ranks.total(0 if batch.reused else len(batch.images), batch.teacher_passes,
                                               int(not torch.isfinite(batch.images).all()))
        if bad:
            raise NonFiniteError("the synthesizer produced non-finite images")
        self.counters.images += images
        self.counters.teacher_passes += passes
        self.last_fresh = batch.images
        seconds = time.time() - t0
        self.counters.synth_seconds += seconds
        self.counters.distill_seconds -= seconds  # the caller times the whole student step
        return batch.images, batch.labels

    # ------------------------------------------------------------ per-epoch bookkeeping

    def _check_weights(self) -> None:
        # one sync for all weights, not one per parameter
        if not torch.isfinite(torch.stack([p.detach().float().sum() for p in self.student.parameters()])).all():
            raise NonFiniteError("student weights became non-finite")

    def _evaluate(self, epoch: int) -> float:
        t0 = time.time()
        self.ranks.sync_buffers(self.student_loss)  # rank 0's BN running statistics, so every student is the same
        acc = self.ranks.evaluate(self.student, self.test_x, self.test_y, self.normalizer, self.device,
                                  self.cfg.eval_batch_size)
        self.counters.eval_seconds += time.time() - t0
        if acc > self.counters.best_acc:
            self.counters.best_acc, self.counters.best_epoch = acc, epoch
        return acc

    def _end_epoch(self, epoch: int, warmup: bool, acc: float, terms: dict[str, list[float]], last: bool) -> None:
        """Append the epoch's record and, unless the run ends here, checkpoint."""
        c = self.counters
        session = time.time() - self._session_start
        record = {
            "epoch": epoch, "test_acc": round(acc, 4), "warmup": warmup,
            "lr": self.optimizer.param_groups[0]["lr"],
            "images": c.images, "teacher_passes": c.teacher_passes, "kd_steps": c.kd_steps,
            "synth_seconds": round(c.synth_seconds, 3), "distill_seconds": round(c.distill_seconds, 3),
            "elapsed_seconds": round(c.elapsed + session, 3),
            **{k: round(v, 6) for k, v in _mean_terms(terms).items()},
        }
        self.folder.append_metrics(record)
        self.reporter.epoch_done(record)
        if not last:
            # the session's wall time so far is part of what resumes
            saved = c.elapsed
            c.elapsed += time.time() - self._session_start
            self.folder.save_checkpoint(self._checkpoint_state(epoch))
            c.elapsed = saved

    # ------------------------------------------------------------ checkpoint and resume

    def _checkpoint_state(self, epoch: int) -> dict[str, Any]:
        return {
            "epoch": epoch,
            "teacher_sha256": self.teacher_meta.get("sha256"),  # a resume must distil the same teacher
            "student": self.student.state_dict(),
            "loss_fn": self.loss_fn.state_dict(),
            "method": self.method.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "pool": None if self.real_pool else self.pool.state_dict(),
            "rng": rng_state(),
            "sampler": self.sampler.get_state(),
            "counters": vars(self.counters),
            **self.ranks.rank_states(method=self.method.state_dict(), rng=rng_state()),
        }

    def try_resume(self) -> bool:
        """Continue from ``checkpoint.pt`` if the folder has one. Returns whether it did."""
        state = self.folder.load_checkpoint()
        if state is None:
            self.folder.truncate_metrics(0)  # a fresh start: no records of an earlier attempt
            return False
        if not isinstance(state, dict) or not isinstance(state.get("epoch"), int):
            raise DfkdError(f"cannot resume from {self.run_dir / CHECKPOINT}: not a dfkd-bench checkpoint; "
                            "delete it to start over")
        theirs, ours = state.get("teacher_sha256"), self.teacher_meta.get("sha256")
        if theirs and ours and theirs != ours:
            raise DfkdError(f"cannot resume {self.run_dir}: its checkpoint was made with teacher sha256 {theirs[:12]}, "
                            f"but the teacher found now is {ours[:12]} ({self.teacher_meta.get('path')}); restore "
                            "that teacher, or start the run over in another folder")
        self.folder.check_metrics(state["epoch"] + 1)
        try:
            self._load_checkpoint(state, self.ranks.own_state(state))  # own: this rank's method state and RNGs
        except (KeyError, RuntimeError, ValueError, TypeError) as exc:
            first = str(exc).splitlines()[0][:160] if str(exc) else ""
            raise DfkdError(f"cannot resume from {self.run_dir / CHECKPOINT}: it does not fit this run "
                            f"({type(exc).__name__}: {first}); delete it to start over") from None
        self.start_epoch = state["epoch"] + 1
        self.folder.truncate_metrics(self.start_epoch)
        self.reporter.message(f"resumed {self.run_dir} after epoch {self.start_epoch}")
        return True

    def _load_checkpoint(self, state: dict[str, Any], own: dict[str, Any]) -> None:
        self.student.load_state_dict(state["student"])
        self.loss_fn.load_state_dict(state["loss_fn"])
        self.method.load_state_dict(own["method"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        if state["pool"] is not None:
            self.pool.load_state_dict(state["pool"])
        set_rng_state(own["rng"])
        self.sampler.set_state(state["sampler"])
        self.counters = Counters(**state["counters"])

    def _load_init_bank(self, bank_dir: Path) -> None:
        path = bank_dir / POOL if bank_dir.is_dir() else bank_dir
        if not path.is_file():
            raise DfkdError(f"no pool in {bank_dir}; build one with a synthesis-only run "
                            "(--set synthesis_only=true)")
        state = safe_load(path, "pool")
        try:
            self.pool.load_state_dict(state)
        except (RuntimeError, KeyError, TypeError, ValueError, AttributeError, IndexError) as exc:
            raise DfkdError(f"{path} is not a pool saved by a synthesis-only run ({type(exc).__name__})") from None
        if tuple(self.pool.tensors()[0].shape[1:]) != self.spec.image_shape:
            raise DfkdError(f"the init bank in {bank_dir} holds images of another shape")
        if (self.method.uses_labels or self.loss_fn.needs_labels) and not self.pool.has_labels:
            raise DfkdError(f"the init bank in {bank_dir} has no labels, which '{self.cfg.method}' with loss "
                            f"'{self.cfg.loss}' needs; build the bank with a method that keeps labels")
        self.reporter.message(f"init bank: {len(self.pool)} images from {bank_dir}")

    # ------------------------------------------------------------ the end

    def _finish(self, status: str, reason: str | None) -> dict[str, Any]:
        metrics = self.folder.metrics()
        c = self.counters
        summary = {
            "status": status,
            "reason": reason,
            "method": self.cfg.method, "loss": self.cfg.loss, "preset": self.cfg.preset,
            "dataset": self.cfg.dataset, "teacher": self.cfg.teacher, "student": self.cfg.student,
            "teacher_arch": self.teacher_meta.get("arch"), "student_arch": getattr(self.student, "dfkd_name", None),
            "seed": self.cfg.seed,
            "epochs_done": len(metrics),
            "final_acc": metrics[-1]["test_acc"] if metrics else None,
            "best_acc": round(c.best_acc, 4) if c.best_acc >= 0 else None,
            "best_epoch": c.best_epoch if c.best_epoch >= 0 else None,
            "teacher_acc": self.teacher_meta.get("test_accuracy"),
            "teacher_sha256": self.teacher_meta.get("sha256"),
            "teacher_path": self.teacher_meta.get("path"),
            "images": c.images, "teacher_passes": c.teacher_passes, "kd_steps": c.kd_steps,
            "synth_seconds": round(c.synth_seconds, 2), "distill_seconds": round(c.distill_seconds, 2),
            "eval_seconds": round(c.eval_seconds, 2), "total_seconds": round(c.elapsed, 2),
            **self.ranks.summary(self.cfg),
            "device": device_name(self.device), "amp": self.amp,
            "amp_dtype": self.cfg.amp_dtype if self.amp else None,
            "versions": versions(), "git_commit": git_commit(),
            "finished": timestamp(),
        }
        samples = None
        if self.last_fresh is not None:
            samples = quantize(self.last_fresh[-64:])
        elif len(self.pool) and not self.real_pool:  # a real-data baseline's pool is not synthetic
            samples = self.pool.last(64)
        self.folder.write_outputs(
            summary,
            student=self.student.state_dict() if status != "failed" else None,
            samples=samples,
            pool=self.pool.state_dict() if self.cfg.synthesis_only else None,
        )
        return summary


__all__ = ["Runner", "Reporter", "SilentReporter"]
