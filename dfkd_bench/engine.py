"""The shared protocol: synthesize -> pool -> distill -> evaluate, the same for every method.

    for epoch in range(epochs):
        for round in range(ep_steps // kd_steps):
            batches.add(method.synthesize())         # sealed: no real data reachable
            for step in range(kd_steps):             # skipped in warm-up epochs
                x = augment(batches.next())          # a pass over the pool, or a fresh batch (batches.py)
                student step on loss(student(x), teacher(x))
        evaluate on the real test set; append metrics; checkpoint

``Runner.run`` and the three methods under it (``_run_epoch``, ``_synthesize``, ``_distill_step``) are
that loop. ``__init__`` composes the parts (:mod:`dfkd_bench.build`); the run folder, checkpoints and
budgets live in :mod:`dfkd_bench.rundir`.
"""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from . import distributed
from .augment import crop_flip
from .batches import batch_source
from .build import StudentLoss, build_loss, build_method, build_models, build_optimizer, build_pool, build_scheduler
from .config import RunConfig
from .data import get_dataset, sealed
from .errors import DfkdError, NonFiniteError
from .method import Outputs, SynthContext
from .registry import SYNTHESIZERS
from .reporting import Reporter, SilentReporter
from .rundir import CHECKPOINT, Counters, RunFolder, budget_reached, run_summary
from .runtime import device_name, rng_state, seed_everything, select_device, set_rng_state
from .selection import SELECTION, HeldOutBatch


class Runner:
    """Runs one (method, dataset, teacher, student, seed) under the shared protocol."""

    def __init__(self, cfg: RunConfig, method_cfg: Any, loss_cfg: Any, run_dir: Path,
                 teacher_store: Path | None = None, reporter: Reporter | None = None):
        self.cfg, self.run_dir = cfg, Path(run_dir)
        self.ranks = distributed.for_run()  # one process, or this rank's view of a data-parallel run
        self.folder = self.ranks.folder(RunFolder(self.run_dir))
        self.reporter = reporter or SilentReporter()
        self.spec = spec = get_dataset(cfg.dataset)
        self.device = device = self.ranks.device(select_device(cfg.device))
        batch_size = self.ranks.share(cfg.batch_size, "batch_size")
        # with amp set: autocast on CUDA; on CPU only with amp_cpu too, so the AMP path can be tested without a GPU
        self.amp = cfg.amp and (self.device.type == "cuda" or cfg.amp_cpu)
        self.amp_dtype = getattr(torch, cfg.amp_dtype)
        self.folder.check_config(cfg.to_dict(), defaults=RunConfig().to_dict(), device_type=self.device.type)
        seed_everything(cfg.seed)
        self.teacher, self.teacher_meta, self.student, self.normalizer = build_models(cfg, spec, teacher_store, device)
        self.test = spec.split("test")  # in memory, or read lazily from class folders (ImageNet)
        if self.teacher_meta.get("test_accuracy") is None:
            self.teacher_meta["test_accuracy"] = self._accuracy(self.teacher)
        if cfg.sync_bn_stats:
            self.ranks.sync_bn_statistics(self.teacher)
        self.method = build_method(cfg, method_cfg, SynthContext(
            self.teacher, self.student, spec.image_shape, spec.num_classes, self.normalizer, self.device,
            self.ranks.share(cfg.synth_batch_size, "synth_batch_size"), self.amp, class_names=spec.names(),
            lr=cfg.lr, warmup_epochs=cfg.warmup_epochs, amp_dtype=self.amp_dtype, epochs=cfg.epochs,
            temperature=cfg.temperature))
        self.loss_fn = build_loss(cfg, loss_cfg, self.teacher, self.student, spec, self.device)
        self.params = list(self.student.parameters()) + list(self.loss_fn.parameters())
        self.student_loss = StudentLoss(self.student, self.loss_fn)
        self.optimizer = build_optimizer(cfg, self.params)
        self.scheduler = build_scheduler(cfg, self.optimizer)
        # loss scaling only for float16: bfloat16 has float32's exponent range
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp and self.amp_dtype == torch.float16)
        self.augment = crop_flip(spec.image_size).to(self.device) if cfg.kd_augment else nn.Identity()
        self.pool = build_pool(cfg, spec, self.run_dir, self.method.uses_labels or self.loss_fn.needs_labels,
                               self.reporter)
        self.counters = Counters()
        method_cls = SYNTHESIZERS.get(cfg.method)
        self.batches = batch_source(method_cls, self.method, self.pool, self.ranks, batch_size, self.counters, cfg.seed)
        # the teacher baseline evaluates its copy of the teacher: no rounds, nothing trained
        self.rounds = 0 if method_cls.student_is_teacher else cfg.rounds_per_epoch
        if self.rounds:
            self.student_loss = self.ranks.wrap(self.student_loss)  # DistributedDataParallel across ranks
        self.ranks.seed(cfg.seed)  # every rank built the same models; from here on each draws its own stream
        self.stateful = dict(  # what a checkpoint saves and a resume loads, besides the epoch, RNGs and method
            student=self.student, loss_fn=self.loss_fn, optimizer=self.optimizer, scaler=self.scaler,
            scheduler=self.scheduler, batches=self.batches, counters=self.counters)
        # the data-free checkpoint rule's held-out images (selection.py); never in the pool
        self.selection = HeldOutBatch(cfg.selection_images, self.run_dir / SELECTION) if cfg.selection_images else None
        self.start_epoch = 0
        # only once every input has been checked (a typo leaves no folder); a folder that has one keeps it
        self.folder.write_config(cfg.to_dict())

    def run(self) -> dict[str, Any]:
        """Run (or continue) the protocol to its end; returns the summary. The folder stays locked to
        this process until then: a second process on it gets a :class:`DfkdError`."""
        self.folder.lock()
        try:
            finished = self.folder.finished_summary()
            if finished is not None:
                self.reporter.message(f"{self.run_dir} is already complete")
                return finished
            self.try_resume()
            self.counters.start_session()
            cfg, status, reason = self.cfg, "complete", None
            self.reporter.start(cfg.epochs * self.rounds, self.start_epoch * self.rounds,
                                f"{cfg.method} {cfg.teacher}->{cfg.student} s{cfg.seed}")
            try:
                for epoch in range(self.start_epoch, cfg.epochs):
                    reason = self._run_epoch(epoch)
                    if reason:
                        status = "budget"
                        break
            except NonFiniteError as exc:
                status, reason = "failed", str(exc)
            self.counters.end_session()
            return self._finish(status, reason)
        finally:
            self.folder.unlock()

    def _run_epoch(self, epoch: int) -> str | None:
        """One epoch: rounds of synthesis + distillation, then evaluation. Returns the budget that stopped it."""
        cfg = self.cfg
        warmup = epoch < cfg.warmup_epochs
        distill = self.rounds > 0 and not (warmup or cfg.synthesis_only)
        terms: dict[str, list[float]] = defaultdict(list)
        self.method.ctx.student_lr = self.optimizer.param_groups[0]["lr"]
        with sealed():
            self.method.on_epoch_start(epoch, warmup)
        stop = None
        for round_ in range(self.rounds):
            self._synthesize(terms)
            if distill:
                with self.counters.timing("distill_seconds"):
                    for _ in range(cfg.kd_steps):
                        self._distill_step(terms)
            # one sync for all weights, not one per parameter
            if not torch.isfinite(torch.stack([p.detach().float().sum() for p in self.student.parameters()])).all():
                raise NonFiniteError("student weights became non-finite")
            self.reporter.round_done(epoch, round_, {k: v[-1] for k, v in terms.items() if v})
            stop = self.ranks.agree(budget_reached(cfg, self.counters))
            if stop:
                break
        if distill:
            self.scheduler.step()
        acc = self._evaluate(epoch)
        agreement = self._selection_agreement(epoch) if distill and self.selection else None
        if stop is None and cfg.max_epochs and epoch + 1 >= cfg.max_epochs < cfg.epochs:
            # the epochs budget stops the schedule `epochs` sets; it never shortens it (that is --set epochs=N)
            stop = f"max_epochs={cfg.max_epochs}"
        if agreement is not None:
            terms["selection_agreement"] = [agreement]
        self._end_epoch(epoch, warmup, acc, terms, last=epoch == cfg.epochs - 1 or stop is not None)
        return stop

    def _selection_agreement(self, epoch: int) -> float:
        """The student's top-1 agreement with the teacher on the held-out images, made after the first epoch
        that trained the student."""
        if not self.selection.ready:
            fresh = SYNTHESIZERS.get(self.cfg.method).batch_source == "fresh"
            self.selection.make(self.method, self.student, self.ranks, epoch, fresh)
        return self.selection.agreement(self.teacher, self.student, self.normalizer, self.device,
                                        self.cfg.eval_batch_size)

    def _synthesize(self, terms: dict[str, list[float]]) -> None:
        """One synthesis round: the method makes a batch (student frozen), the batch source takes it."""
        self.student.eval().requires_grad_(False)
        with self.counters.timing("synth_seconds"):
            with sealed():
                batch = self.method.synthesize()
            batch = self.ranks.gather(batch)  # every rank's share, so all ranks pool the same images
        if not torch.isfinite(batch.images).all():
            raise NonFiniteError("the synthesizer produced non-finite images")
        self.batches.add(batch, keep_labels=self.method.uses_labels)
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
        images, labels = self.batches.next()  # floats in [0, 1], on the device
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

    def _accuracy(self, model: nn.Module) -> float:
        return self.ranks.evaluate(model, self.test, self.normalizer, self.device, self.cfg.eval_batch_size)

    def _evaluate(self, epoch: int) -> float:
        with self.counters.timing("eval_seconds"):
            self.ranks.sync_buffers(self.student_loss)  # rank 0's BN running statistics: every student the same
            acc = self._accuracy(self.student)
        if acc > self.counters.best_acc:
            self.counters.best_acc, self.counters.best_epoch = acc, epoch
        return acc

    def _end_epoch(self, epoch: int, warmup: bool, acc: float, terms: dict[str, list[float]], last: bool) -> None:
        """Append the epoch's record and, unless the run ends here, checkpoint."""
        lr, c = self.optimizer.param_groups[0]["lr"], self.counters
        record = {"epoch": epoch, "test_acc": round(acc, 4), "warmup": warmup, "lr": lr, **c.progress(self.device),
                  **{k: round(sum(v) / len(v), 6) for k, v in terms.items() if v}}
        self.folder.append_metrics(record)
        self.reporter.epoch_done(record)
        if not last:
            self.folder.save_checkpoint({
                "epoch": epoch,
                "teacher_sha256": self.teacher_meta.get("sha256"),  # a resume must distil the same teacher
                **{name: part.state_dict() for name, part in self.stateful.items()},
                "method": self.method.state_dict(), "rng": rng_state(),
                **self.ranks.rank_states(method=self.method.state_dict(), rng=rng_state()),
            })

    def try_resume(self) -> bool:
        """Continue from ``checkpoint.pt`` if the folder has one. Returns whether it did."""
        state = self.folder.load_checkpoint(self.teacher_meta)  # refuses a foreign file or another teacher
        if state is None:
            self.folder.truncate_metrics(0)  # a fresh start: no records of an earlier attempt
            if self.selection:
                self.selection.discard()
            return False
        self.folder.check_metrics(state["epoch"] + 1)
        try:
            own = self.ranks.own_state(state)  # this rank's method state and RNGs
            for name, part in self.stateful.items():
                part.load_state_dict(state[name])
            self.method.load_state_dict(own["method"])
            set_rng_state(own["rng"])
        except (KeyError, RuntimeError, ValueError, TypeError) as exc:
            why = f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:160]}"
            raise DfkdError(f"cannot resume from {self.run_dir / CHECKPOINT}: it does not fit this run ({why}); "
                            "delete it to start over") from None
        self.start_epoch = state["epoch"] + 1
        self.folder.truncate_metrics(self.start_epoch)
        if self.selection:
            self.selection.load(state["epoch"])
        self.reporter.message(f"resumed {self.run_dir} after epoch {self.start_epoch}")
        return True

    def _finish(self, status: str, reason: str | None) -> dict[str, Any]:
        """Write the end-of-run files (the summary last) and return the summary."""
        summary = run_summary(self.cfg, status, reason, self.folder.metrics(), self.counters, self.teacher_meta,
                              student_arch=getattr(self.student, "dfkd_name", None), ranks=self.ranks.summary(self.cfg),
                              device=device_name(self.device), amp_dtype=self.cfg.amp_dtype if self.amp else None,
                              normalization=self.normalizer.values)
        if self.selection:
            summary["selection"] = self.selection.summary()
        self.folder.write_outputs(summary, student=self.student.state_dict() if status != "failed" else None,
                                  samples=self.batches.samples(),
                                  pool=self.pool.state_dict() if self.cfg.synthesis_only else None)
        return summary


__all__ = ["Runner", "Reporter", "SilentReporter"]
