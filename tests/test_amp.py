"""The autocast + GradScaler code path, which otherwise runs only on CUDA, exercised on CPU (amp_cpu)."""

from __future__ import annotations

import json
from collections import defaultdict

import pytest
import torch
from helpers import tiny_runner

from dfkd_bench.batches import FreshBatches
from dfkd_bench.config import RunConfig
from dfkd_bench.errors import DfkdError
from dfkd_bench.registry import SYNTHESIZERS
from dfkd_bench.rundir import CONFIG, SUMMARY

TRAINED = [name for name, cls in SYNTHESIZERS.items() if not cls.student_is_teacher]


def _first_conv_dtypes(model: torch.nn.Module, seen: list[torch.dtype]) -> torch.utils.hooks.RemovableHandle:
    conv = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    return conv.register_forward_hook(lambda m, i, out: seen.append(out.dtype))


def _amp_runner(method: str, dtype: str, run_dir, store, extra: dict | None = None):
    overrides = {"amp": True, "amp_cpu": True, "amp_dtype": dtype, **(extra or {})}
    if "g_steps" in SYNTHESIZERS.get(method).Config.__dataclass_fields__:
        overrides["method.g_steps"] = 2
    return tiny_runner(method, run_dir, store, overrides)


@pytest.mark.parametrize("method", TRAINED)
def test_one_round_under_bfloat16_autocast_on_cpu(method, tiny_store, tmp_path):
    runner = _amp_runner(method, "bfloat16", tmp_path / "run", tiny_store)
    assert runner.amp and not runner.scaler.is_enabled()  # bfloat16 needs no loss scaling
    teacher_dtypes: list[torch.dtype] = []
    student_dtypes: list[torch.dtype] = []
    _first_conv_dtypes(runner.teacher, teacher_dtypes)
    _first_conv_dtypes(runner.student, student_dtypes)
    before = {k: v.clone() for k, v in runner.student.state_dict().items()}
    pool_before = len(runner.pool)
    terms: dict[str, list[float]] = defaultdict(list)

    runner._synthesize(terms)
    if teacher_dtypes:  # methods that run the teacher while synthesizing do it under the run's autocast
        assert set(teacher_dtypes) == {torch.bfloat16}, method
    teacher_dtypes.clear()
    runner._distill_step(terms)

    assert set(teacher_dtypes) == set(student_dtypes) == {torch.bfloat16}  # the student step's autocast
    assert terms and all(torch.isfinite(torch.tensor(v)).all() for v in terms.values()), dict(terms)
    assert any(k.startswith("kd/") for k in terms)
    if isinstance(runner.batches, FreshBatches):
        assert runner.counters.images == runner.cfg.batch_size
    elif runner.batches.synthetic:
        assert len(runner.pool) == pool_before + runner.cfg.synth_batch_size
    after = runner.student.state_dict()
    assert all(torch.isfinite(v.float()).all() for v in after.values())
    assert any(not torch.equal(before[k], after[k]) for k in before)  # the student trained


def test_a_float16_run_on_cpu_goes_through_the_grad_scaler(tiny_store, tmp_path):
    runner = _amp_runner("deepinversion", "float16", tmp_path / "run", tiny_store, {"epochs": 1})
    assert runner.amp and runner.scaler.is_enabled()
    seen: list[torch.dtype] = []
    _first_conv_dtypes(runner.student, seen)
    summary = runner.run()
    assert summary["status"] == "complete", summary["reason"]
    assert summary["amp"] is True and summary["amp_dtype"] == "float16"
    assert torch.float16 in seen
    # the scaler took part: it counted unskipped steps, or lowered its scale after an overflow
    state = runner.scaler.state_dict()
    assert state["_growth_tracker"] > 0 or state["scale"] < 2.0**16, state
    assert json.loads((tmp_path / "run" / SUMMARY).read_text())["amp_dtype"] == "float16"


def test_amp_is_off_by_default_and_on_cpu_needs_amp_cpu_as_well(tiny_store, tmp_path):
    runner = tiny_runner("kd-noise", tmp_path / "run", tiny_store)
    assert not runner.cfg.amp and not runner.amp and not runner.scaler.is_enabled()  # float32, as the authors
    assert not runner.method.ctx.amp
    runner = tiny_runner("kd-noise", tmp_path / "run2", tiny_store, {"amp": True})
    assert runner.cfg.amp and not runner.amp and not runner.method.ctx.amp  # CPU: amp alone does not autocast
    assert tiny_runner("kd-noise", tmp_path / "run3", tiny_store, {"amp": True, "amp_cpu": True}).amp


def test_a_cpu_folder_written_when_amp_was_on_by_default_resumes_and_compares_as_float32(tiny_store, tmp_path):
    from dfkd_bench.results import collect

    run = tiny_runner("kd-noise", tmp_path / "old", tiny_store, {"epochs": 1})
    assert run.run()["status"] == "complete"
    plain = collect(tmp_path).iloc[0]["settings"]  # the tiny budget's keys
    cfg_path = tmp_path / "old" / "config.json"
    old = json.loads(cfg_path.read_text())
    old.update(amp=True, amp_dtype="float16")  # what every CPU run's config said before the default changed
    cfg_path.write_text(json.dumps(old))
    tiny_runner("kd-noise", tmp_path / "old", tiny_store, {"epochs": 1})  # same run: no "holds a different run"
    # autocast was not in effect (summary amp false), so the AMP fields are no setting of this run
    assert "amp" not in plain and collect(tmp_path).iloc[0]["settings"] == plain

    summary_path = tmp_path / "old" / SUMMARY  # the same folder, had it run under autocast
    summary = json.loads(summary_path.read_text())
    summary["amp"] = True
    summary_path.write_text(json.dumps(summary))
    assert collect(tmp_path).iloc[0]["settings"] == f"amp=True, amp_dtype=float16, {plain}"
    with pytest.raises(DfkdError, match="differs in: amp, amp_cpu, amp_dtype"):  # autocast now: another run
        tiny_runner("kd-noise", tmp_path / "old", tiny_store, {"epochs": 1, "amp": True, "amp_cpu": True})


def test_a_bad_amp_dtype_is_a_user_error(tiny_store, tmp_path):
    with pytest.raises(DfkdError, match="amp_dtype must be one of float16, bfloat16"):
        tiny_runner("kd-noise", tmp_path / "run", tiny_store, {"amp_dtype": "float8"})


def test_a_folder_written_before_a_run_field_existed_is_still_the_same_run(tiny_store, tmp_path):
    run_dir = tmp_path / "run"
    first = tiny_runner("kd-noise", run_dir, tiny_store).run()
    config = json.loads((run_dir / CONFIG).read_text())
    for field in ("amp_cpu", "amp_dtype", "sync_bn_stats"):  # fields newer than the folder
        assert config.pop(field) == getattr(RunConfig(), field)
    (run_dir / CONFIG).write_text(json.dumps(config))
    again = tiny_runner("kd-noise", run_dir, tiny_store).run()  # not refused as another run: skipped
    assert again == first
