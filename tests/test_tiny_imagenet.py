"""Tiny-ImageNet from the cs231n folder layout: a generated copy (200 classes, one training image each,
a few validation images) read in the authors' order, cached, refused in one line when absent; a teacher
trained on it and every method and baseline run one tiny epoch at 64 px."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from helpers import TINY_RUN, assert_user_error, tiny_runner
from PIL import Image

from dfkd_bench.cli import cli
from dfkd_bench.data import TINY_IMAGENET, get_dataset
from dfkd_bench.errors import DfkdError
from dfkd_bench.registry import SYNTHESIZERS
from dfkd_bench.teachers import TeacherTrainConfig, train_teacher

CLASSES, VAL = 200, 20


def write_tiny_imagenet(root: Path) -> dict:
    """A Tiny-ImageNet folder with random JPEGs; returns the wnids (shuffled in wnids.txt) and val labels."""
    g = torch.Generator().manual_seed(0)
    folder = root / TINY_IMAGENET
    wnids = [f"n{10000 + 7 * i:08d}" for i in range(CLASSES)]
    listed = [wnids[i] for i in torch.randperm(CLASSES, generator=g).tolist()]  # the file is not sorted
    folder.mkdir(parents=True)
    (folder / "wnids.txt").write_text("\n".join(listed) + "\n")
    (folder / "words.txt").write_text("".join(f"{w}\tthing {i}, other name\n" for i, w in enumerate(wnids)))
    for i, wnid in enumerate(wnids):
        images = folder / "train" / wnid / "images"
        images.mkdir(parents=True)
        pixels = torch.randint(0, 256, (64, 64, 3), generator=g, dtype=torch.uint8).numpy()
        image = Image.fromarray(pixels[:, :, 0], "L") if i == 3 else Image.fromarray(pixels, "RGB")
        image.save(images / f"{wnid}_0.JPEG", "JPEG")  # i == 3: Tiny-ImageNet has some grayscale JPEGs
    (folder / "val" / "images").mkdir(parents=True)
    val_labels = {}
    lines = []
    for j in range(VAL):
        wnid = wnids[(j * 37) % CLASSES]
        name = f"val_{j}.JPEG"
        pixels = torch.randint(0, 256, (64, 64, 3), generator=g, dtype=torch.uint8).numpy()
        Image.fromarray(pixels, "RGB").save(folder / "val" / "images" / name, "JPEG")
        lines.append(f"{name}\t{wnid}\t0\t0\t63\t63")
        val_labels[name] = wnids.index(wnid)
    (folder / "val" / "val_annotations.txt").write_text("\n".join(reversed(lines)) + "\n")
    return {"wnids": wnids, "val_labels": val_labels}


@pytest.fixture(scope="module")
def tiny_imagenet(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_imagenet_data")
    return root, write_tiny_imagenet(root)


@pytest.fixture
def tin_root(tiny_imagenet, monkeypatch) -> Path:
    monkeypatch.setenv("DFKD_BENCH_DATA", str(tiny_imagenet[0]))
    return tiny_imagenet[0]


@pytest.fixture(scope="module")
def tin_store(tiny_imagenet, tmp_path_factory) -> Path:
    store = tmp_path_factory.mktemp("tin_teachers")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DFKD_BENCH_DATA", str(tiny_imagenet[0]))
        train_teacher(get_dataset("tiny-imagenet"), "wrn16_1", TeacherTrainConfig(epochs=1, batch_size=50), store)
    return store


def test_the_splits_are_read_in_the_authors_order_and_cached(tin_root, tiny_imagenet):
    spec = get_dataset("tiny-imagenet")
    assert (spec.num_classes, spec.image_shape, spec.mean, spec.std) == (200, (3, 64, 64), (0.5,) * 3, (0.5,) * 3)
    x, y = spec.load("train")
    assert x.shape == (CLASSES, 3, 64, 64) and x.dtype == torch.uint8
    assert y.tolist() == list(range(CLASSES))  # classes are the sorted wnids, one image each in that order
    vx, vy = spec.load("test")
    expected = [tiny_imagenet[1]["val_labels"][f"val_{j}.JPEG"] for j in sorted(range(VAL), key=lambda j: f"val_{j}")]
    assert vx.shape == (VAL, 3, 64, 64) and vy.tolist() == expected
    cache = tin_root / TINY_IMAGENET / "dfkd-train.pt"
    assert cache.is_file()
    again_x, again_y = spec.load("train")
    assert torch.equal(again_x, x) and torch.equal(again_y, y)
    assert spec.names()[:2] == ("thing 0", "thing 1")


def test_a_missing_tiny_imagenet_is_one_line_naming_what_to_put_where(tmp_path, monkeypatch):
    monkeypatch.setenv("DFKD_BENCH_DATA", str(tmp_path))
    with pytest.raises(DfkdError, match=r"unzip http://cs231n.stanford.edu/tiny-imagenet-200.zip so that .*wnids.txt"):
        get_dataset("tiny-imagenet").load("train")
    assert get_dataset("tiny-imagenet").names() == ()


@pytest.mark.parametrize("method", SYNTHESIZERS.names())
def test_every_method_runs_a_tiny_epoch_at_64_pixels(method, tin_root, tin_store, tmp_path):
    overrides = {**TINY_RUN, "dataset": "tiny-imagenet", "epochs": 1, "warmup_epochs": 0}
    if "g_steps" in {f for f in SYNTHESIZERS.get(method).Config.__dataclass_fields__}:
        overrides["method.g_steps"] = 1
    if method == "nayer":
        overrides["method.label_embeddings"] = "onehot"
    runner = tiny_runner(method, tmp_path / "run", tin_store, overrides)
    summary = runner.run()
    assert summary["status"] == "complete" and summary["epochs_done"] == 1, summary
    assert summary["normalization"] == {"mean": [0.5] * 3, "std": [0.5] * 3}


def test_nayer_runs_on_tiny_imagenet_from_the_command_line(tin_root, tin_store, tmp_path):
    args = ["run", "--method", "nayer", "--dataset", "tiny-imagenet", "--teacher", "wrn16_1", "--student",
            "wrn16_1", "--teacher-store", str(tin_store), "--output", str(tmp_path), "--set", "epochs=1",
            "--set", "ep_steps=2", "--set", "kd_steps=1", "--set", "batch_size=8", "--set", "synth_batch_size=8",
            "--set", "method.g_steps=1", "--set", "method.label_embeddings=onehot"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, (result.output, result.exception)
    assert "final (last-epoch) student accuracy" in result.stdout
    missing = CliRunner().invoke(cli, [*args[:-2], "--set", "method.label_embeddings=onehot", "--teacher-store",
                                       str(tmp_path / "none"), "--no-train-teacher"])
    assert_user_error(missing, "teacher")


def test_nayer_has_the_authors_tiny_imagenet_setting_as_a_preset():
    result = CliRunner().invoke(cli, ["run", "--method", "nayer", "--preset", "paper-tiny-imagenet", "--dry-run"])
    assert result.exit_code == 0, result.output
    cfg = json.loads(result.stdout)
    # scripts/nayer_100.sh:70-73 (tmtuan1307/NAYER)
    assert (cfg["dataset"], cfg["teacher"], cfg["student"]) == ("tiny-imagenet", "resnet34", "resnet18")
    assert (cfg["batch_size"], cfg["synth_batch_size"], cfg["lr"], cfg["ep_steps"], cfg["kd_steps"]) == \
        (256, 200, 0.1, 1000, 1000)
    assert {k: cfg["method_cfg"][k] for k in ("g_steps", "g_loops", "gwp_loops", "g_life")} == \
        {"g_steps": 60, "g_loops": 4, "gwp_loops": 20, "g_life": 10}
    elsewhere = CliRunner().invoke(cli, ["run", "--method", "nayer", "--preset", "paper-tiny-imagenet", "--dataset",
                                         "cifar10", "--dry-run"])
    assert elsewhere.exit_code == 0 and "the authors' setting for tiny-imagenet; this run is on cifar10" in \
        elsewhere.stderr
