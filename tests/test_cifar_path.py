"""The CIFAR path offline: torchvision's on-disk CIFAR layouts are read without a download, a teacher
trains on them, and every registered method and baseline runs on their 3-channel 32-px images
(and, as a slow test, on Fashion-MNIST's 1-channel 28-px images with the shipped teacher).

The fake folders (helpers.write_fake_cifar) hold a few dozen random images, so every run is tiny.
"""

from __future__ import annotations

import dataclasses
import json
import pickle
import urllib.error
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from helpers import FAKE_CIFAR_TEST, FAKE_CIFAR_TRAIN, SHIPPED_TEACHERS, assert_user_error

from dfkd_bench.cli import cli
from dfkd_bench.data import DEBIAN_FASHION_MNIST, get_dataset
from dfkd_bench.errors import DfkdError
from dfkd_bench.registry import SYNTHESIZERS
from dfkd_bench.runtime import sha256_file
from dfkd_bench.teachers import default_train_config, train_teacher

# every registered method and baseline: one added later is covered as soon as it registers
EVERY_NAME = list(SYNTHESIZERS.names())
GRID_PADDING = 2  # the run's samples.png is a grid of 8 images a row with 2 px between them


def invoke(*args) -> object:
    return CliRunner().invoke(cli, [str(a) for a in args])


# ---------------------------------------------------------------- reading the folders

@pytest.mark.parametrize("dataset,classes", [("cifar10", 10), ("cifar100", 100)])
@pytest.mark.parametrize("split,count", [("train", FAKE_CIFAR_TRAIN), ("test", FAKE_CIFAR_TEST)])
def test_reads_the_on_disk_layout_as_torchvision_does(dataset, classes, split, count, fake_cifar, cifar_root,
                                                      monkeypatch):
    import torchvision.datasets as tvd
    import torchvision.datasets.cifar as tv_cifar

    spec = get_dataset(dataset)
    assert spec.image_shape == (3, 32, 32) and spec.num_classes == classes
    images, labels = spec.load(split)
    assert images.shape == (count, 3, 32, 32) and images.dtype == torch.uint8
    assert labels.shape == (count,) and labels.dtype == torch.int64
    written_images, written_labels = fake_cifar[1][dataset][split]
    assert torch.equal(images, written_images) and torch.equal(labels, written_labels)
    # torchvision's own reader, its MD5 checks switched off, sees the same pixels in the same order
    cls = tvd.CIFAR10 if dataset == "cifar10" else tvd.CIFAR100
    monkeypatch.setattr(tv_cifar, "check_integrity", lambda *args, **kwargs: True)
    theirs = cls(str(cifar_root), train=(split == "train"))
    assert torch.equal(images, torch.from_numpy(theirs.data).permute(0, 3, 1, 2))
    assert labels.tolist() == list(theirs.targets)


@pytest.fixture
def offline(monkeypatch):
    """torchvision's download fails as it does without a network."""
    import torchvision.datasets as tvd

    def no_network(self, *args, **kwargs):
        raise urllib.error.URLError("no route to host")

    for cls in (tvd.CIFAR10, tvd.CIFAR100):
        monkeypatch.setattr(cls, "download", no_network)


@pytest.mark.parametrize("dataset,folder,archive", [("cifar10", "cifar-10-batches-py", "cifar-10-python.tar.gz"),
                                                    ("cifar100", "cifar-100-python", "cifar-100-python.tar.gz")])
def test_missing_folder_offline_names_the_folder_and_the_archive(dataset, folder, archive, offline, tmp_path,
                                                                 monkeypatch):
    monkeypatch.setenv("DFKD_BENCH_DATA", str(tmp_path / "data"))
    result = invoke("run", "--method", "deepinversion", "--dataset", dataset, "--teacher", "wrn16_1",
                    "--teacher-store", tmp_path / "store", "--output", tmp_path / "out")
    assert_user_error(result, "not found", str(tmp_path / "data" / folder), archive, "URLError")
    assert not (tmp_path / "out").exists() and not (tmp_path / "store").exists()


def test_an_archive_torchvision_rejects_is_named(offline, tmp_path, monkeypatch):
    (tmp_path / "cifar-10-python.tar.gz").write_bytes(b"not the archive")
    monkeypatch.setenv("DFKD_BENCH_DATA", str(tmp_path))
    with pytest.raises(DfkdError, match="cifar-10-python.tar.gz does not match torchvision's MD5.*replace it"):
        get_dataset("cifar10").load("test")


def _copy_of_fake_cifar10(fake_cifar, tmp_path) -> Path:
    import shutil

    shutil.copytree(fake_cifar[0] / "cifar-10-batches-py", tmp_path / "cifar-10-batches-py")
    return tmp_path / "cifar-10-batches-py"


def test_a_missing_batch_counts_as_a_missing_dataset(fake_cifar, offline, tmp_path, monkeypatch):
    folder = _copy_of_fake_cifar10(fake_cifar, tmp_path)
    (folder / "data_batch_3").unlink()
    monkeypatch.setenv("DFKD_BENCH_DATA", str(tmp_path))
    get_dataset("cifar10").load("test")  # the test split is whole
    with pytest.raises(DfkdError, match="data_batch_1, data_batch_2, data_batch_3"):
        get_dataset("cifar10").load("train")


def test_a_truncated_batch_is_a_one_line_error(fake_cifar, tmp_path, monkeypatch):
    folder = _copy_of_fake_cifar10(fake_cifar, tmp_path)
    raw = (folder / "test_batch").read_bytes()
    (folder / "test_batch").write_bytes(raw[: len(raw) // 2])
    monkeypatch.setenv("DFKD_BENCH_DATA", str(tmp_path))
    with pytest.raises(DfkdError, match="test_batch is not a CIFAR batch file") as info:
        get_dataset("cifar10").load("test")
    assert "\n" not in str(info.value)


def test_a_batch_of_the_wrong_shape_is_refused(fake_cifar, tmp_path, monkeypatch):
    import numpy as np

    folder = _copy_of_fake_cifar10(fake_cifar, tmp_path)
    with open(folder / "test_batch", "wb") as fh:
        pickle.dump({"data": np.zeros((4, 28 * 28), np.uint8), "labels": [0, 1, 2, 3]}, fh, protocol=2)
    monkeypatch.setenv("DFKD_BENCH_DATA", str(tmp_path))
    with pytest.raises(DfkdError, match=r"\(4, 784\)"):
        get_dataset("cifar10").load("test")


def test_labels_outside_the_classes_are_refused(fake_cifar, tmp_path, monkeypatch):
    import shutil

    shutil.copytree(fake_cifar[0] / "cifar-10-batches-py", tmp_path / "cifar-100-python")
    for split in ("train", "test"):  # CIFAR-10's batches under CIFAR-100's names: no fine_labels
        shutil.copy(tmp_path / "cifar-100-python" / "test_batch", tmp_path / "cifar-100-python" / split)
    monkeypatch.setenv("DFKD_BENCH_DATA", str(tmp_path))
    with pytest.raises(DfkdError, match="not a CIFAR batch file.*fine_labels"):
        get_dataset("cifar100").load("test")


class _RunsCode:
    """Unpickling this calls a function: what the CIFAR reader must refuse without calling it."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_a_batch_file_that_would_run_code_is_refused_unrun(fake_cifar, tmp_path, monkeypatch):
    folder = _copy_of_fake_cifar10(fake_cifar, tmp_path)
    marker = tmp_path / "code_ran"
    with open(folder / "test_batch", "wb") as fh:
        pickle.dump({"data": _RunsCode(marker), "labels": []}, fh, protocol=2)
    monkeypatch.setenv("DFKD_BENCH_DATA", str(tmp_path))
    with pytest.raises(DfkdError, match="not a CIFAR batch file"):
        get_dataset("cifar10").load("test")
    assert not marker.exists()


# ---------------------------------------------------------------- teacher and runs

def test_teacher_train_on_cifar100_stores_a_3_channel_100_class_teacher(cifar_root, tmp_path):
    result = invoke("teacher", "train", "--dataset", "cifar100", "--arch", "wrn16_1", "--epochs", "1",
                    "--store", tmp_path)
    assert result.exit_code == 0, (result.output, result.exception)
    assert "1 epoch, 1 step of batch 256" in result.output  # the recipe's batch; 40 images make one step
    assert "(from 1 timed step)" in result.output and "teacher epoch 1/1: test accuracy" in result.output
    meta = json.loads((tmp_path / "cifar100" / "wrn16_1.json").read_text())
    assert (meta["num_classes"], meta["in_chans"], meta["image_size"]) == (100, 3, 32)
    assert meta["sha256"] == sha256_file(tmp_path / "cifar100" / "wrn16_1.pt")
    recipe = dataclasses.asdict(default_train_config("cifar100", epochs=1))
    assert meta["train_settings"] == json.loads(json.dumps(recipe))  # the dataset's recipe, not fashion-mnist's
    assert 0 <= meta["test_accuracy"] <= 100 and len(meta["epoch_accuracies"]) == 1
    state = torch.load(tmp_path / "cifar100" / "wrn16_1.pt", weights_only=True)
    assert state["conv1.weight"].shape[1] == 3 and state["fc.weight"].shape[0] == 100
    assert not list((tmp_path / "cifar100").glob("*.partial.pt"))


@pytest.fixture(scope="module")
def cifar_store(fake_cifar, tmp_path_factory) -> Path:
    """A store with a one-epoch wrn16_1 teacher for the fake CIFAR-10 and CIFAR-100."""
    store = tmp_path_factory.mktemp("cifar_teachers")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DFKD_BENCH_DATA", str(fake_cifar[0]))
        for dataset in ("cifar10", "cifar100"):
            train_teacher(get_dataset(dataset), "wrn16_1", default_train_config(dataset, epochs=1), store)
    return store


def _one_epoch_run(method: str, dataset: str, store: Path, output: Path, teacher: str = "wrn16_1"
                   ) -> tuple[object, Path]:
    args = ["run", "--method", method, "--dataset", dataset, "--teacher", teacher, "--teacher-store", store,
            "--output", output, "--name", "run", "--no-train-teacher"]
    for key, value in (("epochs", 1), ("warmup_epochs", 0), ("ep_steps", 1), ("kd_steps", 1), ("batch_size", 8),
                       ("synth_batch_size", 8), ("eval_batch_size", 64)):
        args += ["--set", f"{key}={value}"]
    if "g_steps" in {f.name for f in dataclasses.fields(SYNTHESIZERS.get(method).Config)}:
        args += ["--set", "method.g_steps=1"]
    return invoke(*args), output / "run"


@pytest.mark.parametrize("method", EVERY_NAME)
def test_every_method_runs_an_epoch_on_cifar10(method, cifar_store, cifar_root, tmp_path):
    result, run_dir = _one_epoch_run(method, "cifar10", cifar_store, tmp_path)
    assert result.exit_code == 0, (result.output, result.exception)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "complete"
    config = json.loads((run_dir / "config.json").read_text())
    assert config["dataset"] == "cifar10" and config["student"] == "wrn16_1"
    student = torch.load(run_dir / "student.pt", weights_only=True)
    assert student["conv1.weight"].shape[1] == 3 and student["fc.weight"].shape[0] == 10
    if (run_dir / "samples.png").is_file():  # runs that synthesize: 8 RGB images of 32 px in a row
        from PIL import Image

        with Image.open(run_dir / "samples.png") as grid:
            assert grid.mode == "RGB"
            assert grid.size == (8 * (32 + GRID_PADDING) + GRID_PADDING, 32 + 2 * GRID_PADDING)
    else:
        assert SYNTHESIZERS.get(method).is_baseline, f"{method} synthesized no samples"


def test_csd_runs_an_epoch_on_cifar100(cifar_store, cifar_root, tmp_path):
    result, run_dir = _one_epoch_run("csd", "cifar100", cifar_store, tmp_path)
    assert result.exit_code == 0, (result.output, result.exception)
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "complete"
    student = torch.load(run_dir / "student.pt", weights_only=True)
    assert student["fc.weight"].shape[0] == 100


# in the default suite (CI installs the Debian package): about a minute, each run evaluating
# on the 10000 real test images
@pytest.mark.skipif(not DEBIAN_FASHION_MNIST.is_dir(), reason="Debian's Fashion-MNIST is not installed")
@pytest.mark.parametrize("method", EVERY_NAME)
def test_every_method_runs_an_epoch_on_fashion_mnist(method, tmp_path):
    result, run_dir = _one_epoch_run(method, "fashion-mnist", SHIPPED_TEACHERS, tmp_path, teacher="wrn16_2")
    assert result.exit_code == 0, (result.output, result.exception)
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "complete"
    student = torch.load(run_dir / "student.pt", weights_only=True)
    assert student["conv1.weight"].shape[1] == 1 and student["fc.weight"].shape[0] == 10
