"""The runner: run folder contents, compare, reproducibility, budgets, failures, resume, config errors."""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import os
import shutil
import subprocess
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import pytest
import timm
import torch
from helpers import TINY, TINY_CLASSES, TINY_RUN, TINY_SHAPE, TINY_SPEC, assert_effect, tiny_runner
from PIL import Image

from dfkd_bench import engine
from dfkd_bench.config import parse_assignments, resolve_config
from dfkd_bench.data import Normalizer, evaluate
from dfkd_bench.errors import DfkdError, UnknownNameError
from dfkd_bench.method import KLLoss, SynthBatch, Synthesizer
from dfkd_bench.registry import get_preset
from dfkd_bench.results import collect, failed_runs, summarize, to_format
from dfkd_bench.runtime import cpu_model, git_commit, sha256_file
from dfkd_bench.teachers import load_state_dict

DI = {"method.g_steps": 2}
ROUNDS_PER_EPOCH = TINY_RUN["ep_steps"] // TINY_RUN["kd_steps"]
IMAGES_PER_ROUND = TINY_RUN["synth_batch_size"]
PASSES_PER_ROUND = TINY_RUN["synth_batch_size"] * DI["method.g_steps"]  # DeepInversion: images x steps


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "student.pt", map_location="cpu", weights_only=True)


def _same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def di_run(tiny_store, tmp_path_factory) -> tuple[Path, dict]:
    """One finished tiny DeepInversion run, shared by the read-only tests below."""
    run_dir = tmp_path_factory.mktemp("di") / "run"
    summary = tiny_runner("deepinversion", run_dir, tiny_store, DI).run()
    return run_dir, summary


# ---------------------------------------------------------------- the run folder

def test_run_folder_holds_every_file(di_run):
    run_dir, summary = di_run
    names = {p.name for p in run_dir.iterdir()}
    assert {"config.json", "metrics.jsonl", "summary.json", "student.pt", "samples.png"} <= names
    assert "checkpoint.pt" not in names  # removed once the run is finished
    assert json.loads((run_dir / "summary.json").read_text()) == summary


def test_config_json_is_the_resolved_config(di_run):
    run_dir, _ = di_run
    config = json.loads((run_dir / "config.json").read_text())
    assert config["method"] == "deepinversion" and config["dataset"] == TINY and config["loss"] == "kl"
    assert config["epochs"] == TINY_RUN["epochs"] and config["seed"] == 0
    assert config["method_cfg"]["g_steps"] == DI["method.g_steps"]
    assert config["method_cfg"]["bn"] == 10.0  # the method's own default, resolved and recorded


def test_a_folders_config_is_written_once_by_the_folder_itself(tmp_path):
    # the folder decides (not each caller): under data parallelism only rank 0 looks at the disk, so no rank
    # can skip the collective call because rank 0 already wrote the file (CI hung on that once)
    from dfkd_bench.rundir import CONFIG, RunFolder

    folder = RunFolder(tmp_path / "run")
    assert folder.write_config({"seed": 0}) is True
    assert folder.write_config({"seed": 1}) is False
    assert json.loads((tmp_path / "run" / CONFIG).read_text()) == {"seed": 0}


def test_metrics_have_one_record_per_epoch_with_counters_and_named_terms(di_run):
    run_dir, _ = di_run
    records = _metrics(run_dir)
    assert [r["epoch"] for r in records] == list(range(TINY_RUN["epochs"]))
    for i, r in enumerate(records):
        assert 0.0 <= r["test_acc"] <= 100.0
        assert r["images"] == IMAGES_PER_ROUND * ROUNDS_PER_EPOCH * (i + 1)
        assert r["teacher_passes"] == PASSES_PER_ROUND * ROUNDS_PER_EPOCH * (i + 1)
        assert r["kd_steps"] == TINY_RUN["ep_steps"] * (i + 1)
        assert r["synth_seconds"] > 0 and r["distill_seconds"] > 0
        for term in ("synth/bn", "synth/ce", "synth/adv", "synth/tv", "synth/total", "kd/kd"):
            assert math.isfinite(r[term]), term
        assert r["synth/bn"] > 0 and r["kd/kd"] >= 0
    assert records[1]["synth_seconds"] >= records[0]["synth_seconds"]  # cumulative
    assert records[1]["lr"] < records[0]["lr"]  # cosine annealing over the epochs
    assert records[-1]["lr"] == 0.0  # to the default floor, lr_min = 0


def test_summary_records_scores_budgets_and_provenance(di_run, tiny_store):
    run_dir, summary = di_run
    records = _metrics(run_dir)
    sidecar = json.loads((tiny_store / TINY / "wrn16_1.json").read_text())
    assert summary["status"] == "complete" and summary["reason"] is None
    assert summary["final_acc"] == records[-1]["test_acc"]  # the score is the last epoch
    assert summary["best_acc"] == max(r["test_acc"] for r in records)
    assert summary["epochs_done"] == TINY_RUN["epochs"]
    assert summary["teacher_acc"] == sidecar["test_accuracy"]
    assert summary["teacher_sha256"] == sidecar["sha256"] == sha256_file(tiny_store / TINY / "wrn16_1.pt")
    assert summary["images"] == IMAGES_PER_ROUND * ROUNDS_PER_EPOCH * TINY_RUN["epochs"]
    assert summary["device"].startswith(f"cpu ({cpu_model()}, ")  # timings and bitwise results depend on the CPU
    assert summary["device"].endswith(f", {torch.backends.cpu.get_cpu_capability()})")  # and on its kernel path
    assert {"python", "torch", "timm", "dfkd_bench"} <= set(summary["versions"])
    assert summary["versions"]["torch"] == torch.__version__
    assert summary["seed"] == 0 and summary["method"] == "deepinversion"


def test_student_checkpoint_is_a_plain_state_dict_of_the_scored_student(di_run):
    run_dir, summary = di_run
    state = _weights(run_dir)  # weights_only=True: no pickled code needed
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    assert _same_weights(state, load_state_dict(run_dir / "student.pt"))
    student = timm.create_model("wrn16_1", num_classes=TINY_CLASSES, in_chans=TINY_SHAPE[0])
    student.load_state_dict(state)  # strict
    test_x, test_y = TINY_SPEC.load("test")
    acc = evaluate(student, test_x, test_y, Normalizer(TINY_SPEC.mean, TINY_SPEC.std), torch.device("cpu"))
    assert round(acc, 4) == summary["final_acc"]


def test_samples_png_is_an_image_grid(di_run):
    run_dir, _ = di_run
    data = (run_dir / "samples.png").read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(run_dir / "samples.png") as img:
        img.verify()
    with Image.open(run_dir / "samples.png") as img:
        assert img.width > TINY_SHAPE[2] and img.height > TINY_SHAPE[1]


def test_compare_reads_the_run(di_run):
    run_dir, summary = di_run
    df = collect(run_dir.parent)
    assert len(df) == 1
    row = df.iloc[0]
    assert row["method"] == "deepinversion" and row["status"] == "complete"
    assert row["final_acc"] == summary["final_acc"] and row["seed"] == 0
    table = summarize(df)
    assert len(table) == 1
    assert table.iloc[0]["acc (last epoch)"] == f"{summary['final_acc']:.2f} ± n/a"
    assert table.iloc[0]["n seeds"] == 1
    assert table.iloc[0]["images"] == summary["images"]
    assert "deepinversion" in to_format(table, "markdown")


# ---------------------------------------------------------------- reproducibility and resume

def test_seeded_cpu_runs_are_reproducible(di_run, tiny_store, tmp_path):
    run_dir, _ = di_run
    tiny_runner("deepinversion", tmp_path / "again", tiny_store, DI).run()
    first, second = _metrics(run_dir), _metrics(tmp_path / "again")
    assert [r["test_acc"] for r in first] == [r["test_acc"] for r in second]
    assert [r["kd/kd"] for r in first] == [r["kd/kd"] for r in second]
    assert [r["synth/total"] for r in first] == [r["synth/total"] for r in second]
    assert _same_weights(_weights(run_dir), _weights(tmp_path / "again"))
    # and the seed matters
    tiny_runner("deepinversion", tmp_path / "other_seed", tiny_store, {**DI, "seed": 1}).run()
    assert not _same_weights(_weights(run_dir), _weights(tmp_path / "other_seed"))


def test_interrupted_run_resumes_to_the_same_result(di_run, tiny_store, tmp_path, monkeypatch):
    run_dir, _ = di_run
    original = engine.Runner._run_epoch

    def interrupt_second_epoch(self, epoch):
        if epoch == 1:
            raise KeyboardInterrupt
        return original(self, epoch)

    monkeypatch.setattr(engine.Runner, "_run_epoch", interrupt_second_epoch)
    with pytest.raises(KeyboardInterrupt):
        tiny_runner("deepinversion", tmp_path / "run", tiny_store, DI).run()
    assert (tmp_path / "run" / "checkpoint.pt").is_file()
    assert not (tmp_path / "run" / "summary.json").exists()
    assert len(_metrics(tmp_path / "run")) == 1
    monkeypatch.undo()
    summary = tiny_runner("deepinversion", tmp_path / "run", tiny_store, DI).run()
    assert summary["status"] == "complete" and summary["epochs_done"] == TINY_RUN["epochs"]
    assert [r["test_acc"] for r in _metrics(tmp_path / "run")] == [r["test_acc"] for r in _metrics(run_dir)]
    assert _same_weights(_weights(run_dir), _weights(tmp_path / "run"))


def test_a_finished_folder_is_not_run_again(di_run, tiny_store):
    run_dir, summary = di_run
    before = (run_dir / "metrics.jsonl").read_text()
    again = tiny_runner("deepinversion", run_dir, tiny_store, DI).run()
    assert again == summary
    assert (run_dir / "metrics.jsonl").read_text() == before


def test_a_folder_holding_another_config_is_refused(di_run, tiny_store):
    run_dir, _ = di_run
    with pytest.raises(DfkdError, match=r"holds a different run \(differs in: seed\)"):
        tiny_runner("deepinversion", run_dir, tiny_store, {**DI, "seed": 7})
    with pytest.raises(DfkdError, match="method_cfg"):
        tiny_runner("deepinversion", run_dir, tiny_store, {"method.g_steps": 3})


# ---------------------------------------------------------------- budgets

@pytest.mark.parametrize("budget,limit", [("max_images", 20), ("max_teacher_passes", 40), ("max_seconds", 1e-6)])
def test_budget_stops_at_the_first_round_that_reaches_it(budget, limit, tiny_store, tmp_path):
    epochs = 4
    summary = tiny_runner("deepinversion", tmp_path / "run", tiny_store,
                          {**DI, "epochs": epochs, budget: limit}).run()
    per_round = {"max_images": IMAGES_PER_ROUND, "max_teacher_passes": PASSES_PER_ROUND}
    rounds = math.ceil(limit / per_round[budget]) if budget in per_round else 1
    assert rounds < epochs * ROUNDS_PER_EPOCH  # the budget, not the schedule, ends the run
    assert summary["status"] == "budget"
    assert summary["reason"].startswith(f"{budget}=")
    assert summary["images"] == rounds * IMAGES_PER_ROUND
    assert summary["teacher_passes"] == rounds * PASSES_PER_ROUND
    assert summary["epochs_done"] == math.ceil(rounds / ROUNDS_PER_EPOCH)
    records = _metrics(tmp_path / "run")
    assert records[-1]["images"] == summary["images"]  # the stopped epoch is still evaluated
    assert (tmp_path / "run" / "student.pt").is_file()
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


# ---------------------------------------------------------------- failures

def _poison_kl_after(monkeypatch, calls: int) -> None:
    """KL turns NaN after ``calls`` student steps."""
    counter = itertools.count(1)
    original = KLLoss.forward

    def forward(self, s, t, y):
        out = original(self, s, t, y)
        if next(counter) > calls:
            out = {k: v * float("nan") for k, v in out.items()}
        return out

    monkeypatch.setattr(KLLoss, "forward", forward)


def test_nan_loss_fails_the_run_and_compare_does_not_average_it(tiny_store, tmp_path, monkeypatch):
    root = tmp_path / "runs"
    _poison_kl_after(monkeypatch, TINY_RUN["ep_steps"])  # the first epoch is fine, the second is not
    failed = tiny_runner("deepinversion", root / "s0", tiny_store, DI).run()
    assert failed["status"] == "failed"
    assert "nan" in failed["reason"] and "kd" in failed["reason"]
    assert failed["epochs_done"] == 1 and failed["final_acc"] is not None
    assert not (root / "s0" / "student.pt").exists()
    assert not (root / "s0" / "checkpoint.pt").exists()
    monkeypatch.undo()
    good = tiny_runner("deepinversion", root / "s1", tiny_store, {**DI, "seed": 1}).run()
    assert good["status"] == "complete"

    df = collect(root)
    assert sorted(df["status"]) == ["complete", "failed"]
    table = summarize(df)
    assert len(table) == 1
    row = table.iloc[0]
    assert row["n seeds"] == 1
    assert row["acc_mean"] == good["final_acc"]
    assert row["acc (last epoch)"] == f"{good['final_acc']:.2f} ± n/a"
    assert failed_runs(df)["reason"].tolist() == [failed["reason"]]


@dataclass
class _EmptyConfig:
    pass


class _NaNImages(Synthesizer):
    name = "test_nan_images"
    summary = "test-only: images full of NaN"
    Config = _EmptyConfig

    def synthesize(self):
        n = self.ctx.synth_batch_size
        return SynthBatch(torch.full((n, *self.ctx.image_shape), float("nan")), teacher_passes=n)


@dataclass
class _TupleConfig:
    betas: tuple[float, float] = (0.5, 0.999)


class _TupleConfigMethod(Synthesizer):
    name = "test_tuple_config"
    summary = "test-only: noise images, a tuple in its config"
    Config = _TupleConfig

    def synthesize(self):
        n = self.ctx.synth_batch_size
        return SynthBatch(torch.rand(n, *self.ctx.image_shape), teacher_passes=n)


def test_nan_images_fail_the_run(register_toy, tiny_store, tmp_path):
    summary = tiny_runner(register_toy(_NaNImages), tmp_path / "run", tiny_store).run()
    assert summary["status"] == "failed"
    assert "non-finite images" in summary["reason"]
    assert summary["images"] == 0  # nothing entered the pool


class _FreshToy(Synthesizer):
    """An online method: no pool, a new batch of constant images for every student step."""

    name = "test-fresh"
    summary = "test only"
    batch_source = "fresh"

    @dataclass
    class Config:
        pass

    def __init__(self, ctx, cfg):
        super().__init__(ctx, cfg)
        self.made: list[torch.Tensor] = []
        self.seen: list[torch.Tensor] = []

    def synthesize(self) -> SynthBatch:
        c, h, w = self.ctx.image_shape
        return SynthBatch(torch.empty(0, c, h, w), teacher_passes=3)  # a generator step, nothing pooled

    def sample(self, n: int) -> SynthBatch:
        images = torch.full((n, *self.ctx.image_shape), (len(self.made) % 5 + 1) / 10, device=self.ctx.device)
        self.made.append(images)
        return SynthBatch(images, teacher_passes=0)

    def after_student_step(self, x, y):
        self.seen.append(x)
        return {}


def test_fresh_methods_train_on_a_new_batch_every_step_and_pool_nothing(register_toy, tiny_store, tmp_path):
    runner = tiny_runner(register_toy(_FreshToy), tmp_path / "run", tiny_store, {"kd_augment": "false"})
    summary = runner.run()
    method, steps = runner.method, TINY_RUN["ep_steps"] * TINY_RUN["epochs"]
    assert summary["status"] == "complete" and len(runner.pool) == 0
    assert len(method.made) == len(method.seen) == steps  # one fresh batch per student step
    for made, seen in zip(method.made, method.seen):
        assert torch.allclose(seen, runner.normalizer(made))  # the student got exactly that batch
    assert summary["images"] == steps * TINY_RUN["batch_size"]  # trained-on images count as synthesized
    assert summary["teacher_passes"] == 3 * TINY_RUN["epochs"] * ROUNDS_PER_EPOCH
    assert (tmp_path / "run" / "samples.png").is_file()  # the last fresh batch


def _student_grad_norm(runner) -> float:
    return torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in runner.params if p.grad is not None])).item()


@pytest.mark.numeric
def test_the_student_optimizer_can_be_adam_with_a_clipped_gradient(tiny_store, tmp_path):
    norms = {}
    for clip in (0.0, 1e-3):
        runner = tiny_runner("kd-noise", tmp_path / f"run{clip}", tiny_store,
                             {"optimizer": "adam", "lr": "1e-3", "weight_decay": "0", "grad_clip": str(clip)})
        assert isinstance(runner.optimizer, torch.optim.Adam)
        assert runner.optimizer.param_groups[0]["lr"] == 1e-3
        runner._synthesize(defaultdict(list))
        runner._distill_step(defaultdict(list))
        norms[clip] = _student_grad_norm(runner)
    assert_effect(norms[0.0], 1e-2, "unclipped gradient norm over 10x the threshold")  # far above it ...
    assert norms[1e-3] == pytest.approx(1e-3, rel=1e-4)  # ... and the clipped one is cut down to it


def test_the_default_student_optimizer_is_the_shared_protocols_sgd(tiny_store, tmp_path):
    runner = tiny_runner("kd-noise", tmp_path / "run", tiny_store)
    assert type(runner.optimizer) is torch.optim.SGD and runner.cfg.grad_clip == 0.0
    assert runner.optimizer.param_groups[0]["momentum"] == runner.cfg.momentum


@pytest.mark.parametrize("warmup,milestones,expected", [
    (0, "1,3", [1, 0.5, 0.5, 0.25]),  # the lr of epochs 0-3
    (1, "2", [1, 0.5, 0.5]),  # epochs 1-3: a warm-up epoch trains nothing, milestones still count run epochs
])
def test_a_step_schedule_cuts_the_lr_from_each_milestone_epoch_on(warmup, milestones, expected, tiny_store,
                                                                  tmp_path):
    runner = tiny_runner("kd-noise", tmp_path / "run", tiny_store, {
        "epochs": 4, "warmup_epochs": warmup, "lr_schedule": "step", "lr_milestones": milestones, "lr_gamma": 0.5})
    seen: list[float] = []
    step = runner._distill_step

    def spy(terms):
        seen.append(runner.optimizer.param_groups[0]["lr"])
        step(terms)

    runner._distill_step = spy
    assert runner.run()["status"] == "complete"
    per_epoch = seen[::TINY_RUN["ep_steps"]]
    assert len(seen) == len(expected) * TINY_RUN["ep_steps"]
    assert per_epoch == pytest.approx([runner.cfg.lr * f for f in expected])


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_git_commit_is_dirty_for_changed_code_but_not_for_changed_results(tmp_path):
    git = ["git", "-c", "user.name=test", "-c", "user.email=test@example.org", "-C", str(tmp_path)]
    (tmp_path / "code.py").write_text("a = 1\n")
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "summary.json").write_text("{}")
    for args in (["init", "-q"], ["add", "."], ["commit", "-qm", "first"]):
        subprocess.run([*git, *args], check=True, capture_output=True)
    sha = subprocess.run([*git, "rev-parse", "HEAD"], check=True, capture_output=True, text=True).stdout.strip()
    assert git_commit(tmp_path) == sha
    subprocess.run([*git, "rm", "-q", "results/summary.json"], check=True)  # replacing old results
    assert git_commit(tmp_path) == sha
    (tmp_path / "code.py").write_text("a = 2\n")
    assert git_commit(tmp_path) == sha + "+dirty"


def test_rerunning_a_failed_folder_starts_clean(tiny_store, tmp_path, monkeypatch):
    _poison_kl_after(monkeypatch, TINY_RUN["ep_steps"])
    assert tiny_runner("deepinversion", tmp_path / "run", tiny_store, DI).run()["status"] == "failed"
    monkeypatch.undo()
    summary = tiny_runner("deepinversion", tmp_path / "run", tiny_store, DI).run()
    assert summary["status"] == "complete"
    assert [r["epoch"] for r in _metrics(tmp_path / "run")] == list(range(TINY_RUN["epochs"]))
    assert summary["epochs_done"] == TINY_RUN["epochs"]


def test_same_config_with_a_tuple_setting_reopens_its_folder(register_toy, tiny_store, tmp_path):
    name = register_toy(_TupleConfigMethod)
    first = tiny_runner(name, tmp_path / "run", tiny_store).run()
    assert first["status"] == "complete"
    assert tiny_runner(name, tmp_path / "run", tiny_store).run() == first


# ---------------------------------------------------------------- --set and the config

def test_set_values_are_parsed_to_the_field_types():
    cfg, method_cfg, _ = resolve_config("deepinversion", "quick", {
        "epochs": "3", "g_steps": "4", "lr": "1e-2", "kd_augment": "false", "max_images": "1e3",
        "method.adv_mode": "js"})
    assert cfg.epochs == 3 and cfg.lr == 0.01 and cfg.kd_augment is False and cfg.max_images == 1000
    assert method_cfg.g_steps == 4 and method_cfg.adv_mode == "js"  # a bare key falls through to the method
    assert cfg.method_cfg == dataclasses.asdict(method_cfg)


def test_preset_values_apply_and_set_overrides_them():
    preset = get_preset("deepinversion", "quick")
    cfg, method_cfg, _ = resolve_config("deepinversion", "quick")
    assert cfg.epochs == preset["epochs"] and method_cfg.g_steps == preset["method.g_steps"]
    cfg, method_cfg, _ = resolve_config("deepinversion", "quick", {"epochs": "1", "method.g_steps": "9"})
    assert cfg.epochs == 1 and method_cfg.g_steps == 9


@pytest.mark.parametrize("overrides,message", [
    ({"no_such_key": "1"}, "unknown setting 'no_such_key'"),
    ({"epoch": "1"}, "did you mean 'epochs'"),
    ({"method.no_such": "1"}, "unknown setting of method deepinversion 'no_such'"),
    ({"loss.no_such": "1"}, "unknown setting of loss kl 'no_such'"),
    ({"epochs": "abc"}, "--set epochs=abc: expected a value of type int"),
    ({"epochs": "1.5"}, "expected a value of type int"),
    ({"lr": "fast"}, "expected a value of type float"),
    ({"kd_augment": "maybe"}, "expected a value of type bool"),
    ({"method.g_steps": "many"}, "--set method.g_steps=many"),
    ({"epochs": "0"}, "epochs must be positive"),
    ({"batch_size": "-8"}, "batch_size must be positive"),
    ({"max_images": "-1"}, "max_images must be zero"),
    ({"warmup_epochs": "5", "epochs": "5"}, "warmup_epochs"),
    ({"lr_min": "0.5", "lr": "0.1"}, "lr_min (0.5) must not exceed lr"),
    ({"lr_min": "-1"}, "lr_min must be a finite non-negative number"),
    ({"optimizer": "rmsprop"}, "optimizer must be one of sgd, adam, got 'rmsprop'"),
    ({"grad_clip": "-5"}, "grad_clip must be a finite non-negative number"),
    ({"lr_schedule": "linear"}, "lr_schedule must be one of cosine, step, got 'linear'"),
    ({"lr_schedule": "step"}, "lr_schedule=step needs lr_milestones"),
    ({"lr_schedule": "step", "lr_milestones": "5,3"}, "lr_milestones must increase"),
    ({"lr_schedule": "step", "lr_milestones": "2,99", "epochs": "10"}, "(0 < m < 10), got 2,99"),
    ({"lr_schedule": "step", "lr_milestones": "2", "lr_gamma": "0"}, "lr_gamma must be in (0, 1]"),
    ({"lr_schedule": "step", "lr_milestones": "2", "lr_min": "1e-3"}, "lr_schedule=step has none"),
    ({"lr_milestones": "2"}, "lr_milestones apply to lr_schedule=step only"),
    ({"loss": "no_such_loss"}, "unknown distillation loss 'no_such_loss'"),
])
def test_bad_set_values_are_user_errors(overrides, message):
    with pytest.raises(DfkdError) as info:
        resolve_config("deepinversion", "quick", overrides)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_unknown_method_and_preset_are_user_errors():
    with pytest.raises(UnknownNameError, match="did you mean 'deepinversion'"):
        resolve_config("deepinversio", "quick")
    with pytest.raises(UnknownNameError, match="unknown preset for deepinversion 'nope'"):
        resolve_config("deepinversion", "nope")


@pytest.mark.parametrize("item", ["epochs", "=3", ""])
def test_set_needs_key_equals_value(item):
    with pytest.raises(DfkdError, match="--set takes key=value"):
        parse_assignments([item])


def test_parse_assignments_splits_at_the_first_equals_sign():
    assert parse_assignments(["a=1", " b = x=y "]) == {"a": "1", "b": "x=y"}


@pytest.mark.parametrize("key", ["lr", "temperature"])
def test_nan_learning_rate_or_temperature_is_rejected(key):
    with pytest.raises(DfkdError):
        resolve_config("deepinversion", "quick", {key: "nan"})


def test_channels_last_runs_and_stores_a_student_a_plain_model_loads(tiny_store, tmp_path):
    runner = tiny_runner("fast", tmp_path / "run", tiny_store, {"channels_last": True, "method.g_steps": 1})
    convs = [m for model in (runner.teacher, runner.student) for m in model.modules()
             if isinstance(m, torch.nn.Conv2d)]
    assert convs and all(c.weight.is_contiguous(memory_format=torch.channels_last) for c in convs)
    assert runner.run()["status"] == "complete"
    student = timm.create_model("wrn16_1", num_classes=TINY_CLASSES, in_chans=TINY_SHAPE[0])
    student.load_state_dict(load_state_dict(tmp_path / "run" / "student.pt"))  # default memory format


# torch 2.14's inductor emits vectorized C++ that does not build under ATEN_CPU_CAPABILITY=default
# ("'at::vec' has not been declared"): compile needs a vector kernel path (results/speed/compile-cpu.md)
NEEDS_INDUCTOR_VEC = pytest.mark.skipif(os.environ.get("ATEN_CPU_CAPABILITY") == "default",
                                        reason="inductor's C++ does not build under ATEN_CPU_CAPABILITY=default")


@NEEDS_INDUCTOR_VEC
@pytest.mark.slow  # compiles the backbones: about a minute of C++ compilation on a 2-core CPU
def test_compile_runs_the_compiled_backbones_and_stores_a_plain_student(tiny_store, tmp_path):
    runner = tiny_runner("fast", tmp_path / "run", tiny_store, {"compile": True, "method.g_steps": 1})
    x = torch.randn(4, *TINY_SHAPE)
    runner.teacher.eval()
    eager = type(runner.teacher).forward_features(runner.teacher, x)  # the class's own, uncompiled method
    torch.testing.assert_close(runner.teacher.forward_features(x), eager, rtol=1e-4, atol=1e-4)
    for model in (runner.teacher, runner.student):
        assert "forward_features" in vars(model)  # the instance's compiled backbone, not the class's method
    assert runner.run()["status"] == "complete"
    assert "forward_features" not in str(list(load_state_dict(tmp_path / "run" / "student.pt")))
    student = timm.create_model("wrn16_1", num_classes=TINY_CLASSES, in_chans=TINY_SHAPE[0])
    student.load_state_dict(load_state_dict(tmp_path / "run" / "student.pt"))


@NEEDS_INDUCTOR_VEC
@pytest.mark.slow  # compiles a backbone (tens of seconds)
def test_compiled_backbone_follows_hooks_switched_on_after_compilation():
    from dfkd_bench.build import compile_features
    from dfkd_bench.losses import BNStatistics

    torch.manual_seed(0)
    model = timm.create_model("wrn16_1", num_classes=TINY_CLASSES, in_chans=TINY_SHAPE[0]).eval()
    x = torch.randn(4, *TINY_SHAPE)
    eager_stats = BNStatistics(model)
    model(x)
    eager = eager_stats.loss()
    for hook in eager_stats.hooks:
        hook.remove()
    stats = BNStatistics(model, active=False)
    compile_features(model)
    x.requires_grad_(True)
    model(x)  # compiled with the hooks off (the runner's teacher passes outside synthesis)
    assert all(hook.loss is None for hook in stats.hooks)
    with stats.recording():  # switched on, same input: they must run, and carry the gradient
        model(x)
    torch.testing.assert_close(stats.loss(), eager, rtol=1e-4, atol=1e-4)
    stats.loss().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


@NEEDS_INDUCTOR_VEC
@pytest.mark.slow  # compiles two runs' backbones
def test_compiled_runs_in_one_process_each_get_dynamos_full_recompile_budget(tiny_store, tmp_path, caplog):
    # a local sweep builds its runs in one process; without a reset the second method's variants passed
    # dynamo's limit of 8 per function and fell back to eager (results/speed/compile-cpu.md)
    with caplog.at_level("WARNING", logger="torch._dynamo"):
        for name in ("fast", "cmi"):
            runner = tiny_runner(name, tmp_path / name, tiny_store, {"compile": True, "method.g_steps": 1})
            assert runner.run()["status"] == "complete"
    assert "recompile_limit" not in caplog.text
