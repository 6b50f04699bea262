"""The data-free checkpoint rule: held-out synthetic images made once by the method, the student's agreement
with the teacher on them after every trained epoch, and compare's pick; turning it on changes no trained number."""

from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner
from helpers import assert_user_error, tiny_runner

from dfkd_bench.cli import cli
from dfkd_bench.engine import Runner
from dfkd_bench.registry import SYNTHESIZERS
from dfkd_bench.results import collect, data_free_pick, is_baseline, summarize
from dfkd_bench.rundir import MACHINE_FIELDS, METRICS, STUDENT, read_metrics
from dfkd_bench.runtime import safe_load
from dfkd_bench.selection import SELECTION

HELD_OUT = 12  # more than one tiny synthesis batch (8): two rounds of the method


def _overrides(method: str, selection: int) -> dict:
    values = {"epochs": 3, "warmup_epochs": 1, "selection_images": selection}
    if "g_steps" in SYNTHESIZERS.get(method).Config.__dataclass_fields__:
        values["method.g_steps"] = 2
    return values


def _records(run_dir) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in MACHINE_FIELDS} for r in read_metrics(run_dir / METRICS)]


@pytest.mark.parametrize("method", [n for n, c in SYNTHESIZERS.items()
                                    if not c.student_is_teacher and c.real_data_split is None])
def test_the_rule_changes_no_trained_number(method, tiny_store, tmp_path):
    plain = tiny_runner(method, tmp_path / "plain", tiny_store, _overrides(method, 0)).run()
    ruled = tiny_runner(method, tmp_path / "ruled", tiny_store, _overrides(method, HELD_OUT)).run()
    a = safe_load(tmp_path / "plain" / STUDENT, "student")
    b = safe_load(tmp_path / "ruled" / STUDENT, "student")
    assert all(torch.equal(a[k], b[k]) for k in a), "the held-out synthesis moved the student"
    with_rule = _records(tmp_path / "ruled")
    assert [{k: v for k, v in r.items() if k != "selection_agreement"} for r in with_rule] == _records(
        tmp_path / "plain")
    assert plain["images"] == ruled["images"] and plain["teacher_passes"] == ruled["teacher_passes"]
    # epoch 0 is warm-up (no student step): no agreement; afterwards one per epoch, a percentage
    assert "selection_agreement" not in with_rule[0]
    agreements = [r["selection_agreement"] for r in with_rule[1:]]
    assert len(agreements) == 2 and all(0 <= a <= 100 for a in agreements)
    held = safe_load(tmp_path / "ruled" / SELECTION, "selection")
    assert held["images"].shape[0] == HELD_OUT and held["made_after_epoch"] == 1
    assert torch.isfinite(held["images"]).all()  # pixels as the student would see them (DFAD's may leave [0, 1])
    assert ruled["selection"]["teacher_passes"] == held["teacher_passes"]
    if not is_baseline(method):  # rounds pass the teacher; a fresh method's new draw from its generator does not
        assert (held["teacher_passes"] > 0) != (SYNTHESIZERS.get(method).batch_source == "fresh")


def test_a_resumed_run_reads_its_held_out_images_back(tiny_store, tmp_path, monkeypatch):
    overrides = _overrides("fast", HELD_OUT)
    reference = tiny_runner("fast", tmp_path / "reference", tiny_store, overrides)
    reference.run()
    epoch_runner = Runner._run_epoch

    def stop_at_last_epoch(self, epoch):
        if epoch == 2:
            raise KeyboardInterrupt
        return epoch_runner(self, epoch)

    monkeypatch.setattr(Runner, "_run_epoch", stop_at_last_epoch)
    with pytest.raises(KeyboardInterrupt):
        tiny_runner("fast", tmp_path / "run", tiny_store, overrides).run()
    monkeypatch.setattr(Runner, "_run_epoch", epoch_runner)
    resumed = tiny_runner("fast", tmp_path / "run", tiny_store, overrides)
    resumed.run()
    assert resumed.start_epoch == 2 and resumed.selection.made_after_epoch == 1
    assert _records(tmp_path / "run") == _records(tmp_path / "reference")


def test_compare_reports_the_epoch_the_rule_picks(tiny_store, tmp_path):
    for seed in (0, 1):
        tiny_runner("fast", tmp_path / f"s{seed}", tiny_store, {**_overrides("fast", HELD_OUT), "seed": seed}).run()
    df = collect(tmp_path)
    for _, row in df.iterrows():
        records = read_metrics(tmp_path / f"s{row['seed']}" / METRICS)
        best = max(r["selection_agreement"] for r in records if "selection_agreement" in r)
        picked = [r for r in records if r.get("selection_agreement") == best][-1]
        assert (row["selected_epoch"], row["selected_acc"]) == (picked["epoch"], picked["test_acc"])
    table = summarize(df)
    mean = df["selected_acc"].mean()
    assert table["data-free pick"].iloc[0].startswith(f"{mean:.2f} ±")
    shown = CliRunner().invoke(cli, ["compare", str(tmp_path)], terminal_width=160)
    assert shown.exit_code == 0 and "data-free pick" in shown.output and "never trained on" in shown.output


def test_the_pick_is_the_latest_epoch_of_highest_agreement_and_needs_the_records():
    records = [{"epoch": 0, "test_acc": 10.0}, {"epoch": 1, "test_acc": 20.0, "selection_agreement": 50.0},
               {"epoch": 2, "test_acc": 30.0, "selection_agreement": 75.0},
               {"epoch": 3, "test_acc": 25.0, "selection_agreement": 75.0},
               {"epoch": 4, "test_acc": 40.0, "selection_agreement": 60.0}]
    assert data_free_pick(records) == {"selected_epoch": 3, "selected_acc": 25.0}
    assert data_free_pick(records[:1]) == {"selected_epoch": None, "selected_acc": None}


def test_a_negative_count_or_a_method_without_images_is_one_line():
    result = CliRunner().invoke(cli, ["run", "--method", "fast", "--set", "selection_images=-1", "--dry-run"])
    assert_user_error(result, "selection_images must be zero (off)")
    for baseline in ("kd-real", "teacher"):
        result = CliRunner().invoke(cli, ["run", "--method", baseline, "--set", "selection_images=8", "--dry-run"])
        assert_user_error(result, f"'{baseline}' synthesizes no images of its own")
