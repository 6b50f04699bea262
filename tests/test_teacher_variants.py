"""Teacher variants: several teachers of one (dataset, architecture) in the store, told apart by a name
(``wrn16_1@s1``), each with its own sidecar and sha256, carried by runs, their folders and summaries."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner
from helpers import TINY, TINY_CLI, TINY_SPEC, assert_user_error

from dfkd_bench.cli import cli
from dfkd_bench.errors import DfkdError
from dfkd_bench.teachers import split_teacher, stored_name, teacher_paths, variant_seed
from dfkd_bench.zoo import paper_student

TRAIN = ["teacher", "train", "--dataset", TINY, "--arch", "wrn16_1", "--epochs", "1", "--batch-size", "64"]


def test_teacher_names_split_into_architecture_and_variant():
    assert split_teacher("wrn16_2@s1") == ("wrn16_2", "s1") and split_teacher("wrn16_2") == ("wrn16_2", None)
    assert stored_name("resnet34@released", 32) == "cifar_resnet34@released"
    assert (variant_seed("wrn16_2"), variant_seed("wrn16_2@s12"), variant_seed("wrn16_2@released")) == (0, 12, None)
    assert paper_student("wrn16_2@s3") == "wrn16_1" and paper_student("resnet34@x") == "resnet18"
    for bad in ("wrn16_2@", "wrn16_2@a/b", "wrn16_2@-x"):
        with pytest.raises(DfkdError, match="a variant after '@'"):
            split_teacher(bad)


@pytest.fixture(scope="module")
def variant_store(tmp_path_factory):
    """The tiny dataset's wrn16_1 trained with seeds 0 and 1: the plain name and the variant @s1."""
    store = tmp_path_factory.mktemp("variants")
    for seed in ("0", "1"):
        result = CliRunner().invoke(cli, ["--plugin", "helpers", *TRAIN, "--seed", seed, "--store", str(store)])
        assert result.exit_code == 0, (result.output, result.exception)
    return store


def test_train_with_another_seed_stores_a_variant_beside_the_plain_teacher(variant_store):
    plain = json.loads(teacher_paths(variant_store, TINY, "wrn16_1")[1].read_text())
    s1 = json.loads(teacher_paths(variant_store, TINY, "wrn16_1@s1")[1].read_text())
    assert plain["variant"] is None and s1["variant"] == "s1" and s1["arch"] == "wrn16_1"
    assert (plain["train_settings"]["seed"], s1["train_settings"]["seed"]) == (0, 1)
    assert plain["sha256"] != s1["sha256"]
    again = CliRunner().invoke(cli, ["--plugin", "helpers", *TRAIN, "--seed", "1", "--store", str(variant_store)])
    assert_user_error(again, "--force")  # a variant is never overwritten silently either
    listed = CliRunner().invoke(cli, ["--plugin", "helpers", "teacher", "list", "--store", str(variant_store)])
    assert " s1 " in listed.stdout


def test_a_run_on_a_variant_carries_its_name_and_sha256(variant_store, tmp_path):
    result = CliRunner().invoke(cli, ["--plugin", "helpers", "run", "--method", "kd-noise", *TINY_CLI[:2],
                                      "--teacher", "wrn16_1@s1", "--student", "wrn16_1", *TINY_CLI[6:-2],
                                      "--teacher-store", str(variant_store), "--output", str(tmp_path)])
    assert result.exit_code == 0, (result.output, result.exception)
    folder = tmp_path / f"{TINY}-wrn16_1@s1-wrn16_1-kd-noise-quick-s0"
    summary = json.loads((folder / "summary.json").read_text())
    sidecar = json.loads(teacher_paths(variant_store, TINY, "wrn16_1@s1")[1].read_text())
    assert summary["teacher"] == "wrn16_1@s1" and summary["teacher_variant"] == "s1"
    assert summary["teacher_sha256"] == sidecar["sha256"] and summary["teacher_arch"] == "wrn16_1"


def test_a_missing_seed_variant_is_trained_with_that_seed_and_a_named_one_is_refused(variant_store, tmp_path):
    from dfkd_bench.api import ensure_teacher, plan_run

    store = tmp_path / "store"
    plan = plan_run("kd-noise", "quick", {"dataset": TINY}, teacher="wrn16_1@s2", student="wrn16_1")
    ensure_teacher(plan.cfg, store, True)
    meta = json.loads(teacher_paths(store, TINY, "wrn16_1@s2")[1].read_text())
    assert meta["variant"] == "s2" and meta["train_settings"]["seed"] == 2
    named = plan_run("kd-noise", "quick", {"dataset": TINY}, teacher="wrn16_1@released", student="wrn16_1")
    with pytest.raises(DfkdError, match=r"no wrn16_1@released teacher .* import it with: dfkd-bench teacher import"):
        ensure_teacher(named.cfg, store, True)
    assert TINY_SPEC.name == TINY


def test_a_sweep_over_teacher_variants_keeps_them_apart(variant_store, tmp_path):
    result = CliRunner().invoke(cli, ["--plugin", "helpers", "sweep", "--methods", "kd-noise", "--seeds", "0",
                                      "--dataset", TINY, "--teachers", "wrn16_1,wrn16_1@s1", "--student", "wrn16_1",
                                      *TINY_CLI[6:-2], "--teacher-store", str(variant_store), "--output", str(tmp_path),
                                      "--no-train-teacher"])
    assert result.exit_code == 0, (result.output, result.exception)
    markdown = CliRunner().invoke(cli, ["--plugin", "helpers", "compare", str(tmp_path), "--format", "markdown"])
    rows = [line for line in markdown.stdout.splitlines() if "| kd-noise |" in line]
    assert len(rows) == 2 and any("| wrn16_1@s1 |" in r for r in rows)
