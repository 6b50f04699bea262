"""Every bad input a user can give `run`: one line, exit code 2, and nothing already written lost."""

from __future__ import annotations

import gzip
import hashlib
import urllib.error
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from helpers import SHIPPED_TEACHERS, TINY_CLI, assert_user_error

from dfkd_bench import data
from dfkd_bench.cli import cli
from dfkd_bench.zoo import create_model


def _fingerprint(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, tiny_store):
    """A finished run in ``out/`` that no bad command may touch, and the files the cases need."""
    root = tmp_path_factory.mktemp("bad-input")
    result = CliRunner().invoke(cli, ["run", "--method", "deepinversion", *TINY_CLI, "--teacher-store",
                                      str(tiny_store), "--output", str(root / "out"), "--name", "done"])
    assert result.exit_code == 0, result.output
    files = {}
    state = create_model("wrn16_1", 4, 3, 16).state_dict()
    torch.save(state, root / "good.pt")
    raw = (root / "good.pt").read_bytes()
    (root / "truncated.pt").write_bytes(raw[: len(raw) // 3])
    (root / "notes.txt").write_text("not a checkpoint\n")
    torch.save(create_model("wrn16_2", 4, 3, 16).state_dict(), root / "other_arch.pt")
    torch.save(create_model("wrn16_1", 10, 3, 16).state_dict(), root / "other_classes.pt")
    torch.save({"state_dict": state, "extra": _Pickled()}, root / "pickled.pt")
    (root / "a_file").write_text("output cannot go below a file\n")
    files.update({k: root / f"{k}.pt" for k in ("truncated", "other_arch", "other_classes", "pickled")})
    files["notes"] = root / "notes.txt"
    return root, files


class _Pickled:
    """Only loads by running this module's code: what weights_only=True must refuse."""


def _teacher(path: Path) -> list[str]:
    return ["--set", f"teacher_checkpoint={path}"]


# (case id, extra arguments given files, fragments of the one-line error)
CASES = [
    ("unknown method", lambda f: ["--method", "deepinversio"], ["unknown method", "did you mean"]),
    ("unknown model", lambda f: ["--student", "wrn16_9"], ["unknown model 'wrn16_9'"]),
    ("unknown dataset", lambda f: ["--dataset", "cifar11"], ["unknown dataset 'cifar11'"]),
    ("unknown preset", lambda f: ["--preset", "fastest"], ["unknown preset for deepinversion 'fastest'"]),
    ("unknown loss", lambda f: ["--loss", "kll"], ["unknown distillation loss 'kll'"]),
    ("--set unknown key", lambda f: ["--set", "epoch=3"], ["unknown setting 'epoch'", "epochs"]),
    ("--set wrong type", lambda f: ["--set", "lr=fast"], ["lr=fast", "float"]),
    ("--set wrong type for a method field", lambda f: ["--set", "method.flip=maybe"], ["bool"]),
    ("teacher checkpoint missing", lambda f: _teacher("/nonexistent/teacher.pt"), ["does not exist"]),
    ("teacher checkpoint truncated", lambda f: _teacher(f["truncated"]), ["not a readable checkpoint"]),
    ("teacher file not a checkpoint", lambda f: _teacher(f["notes"]), ["not a readable checkpoint"]),
    ("teacher of another architecture", lambda f: _teacher(f["other_arch"]), ["not a 'wrn16_1' checkpoint"]),
    ("teacher for another number of classes", lambda f: _teacher(f["other_classes"]),
     ["another number of classes"]),
    ("teacher needing pickled code", lambda f: _teacher(f["pickled"]), ["pickled code"]),
    ("zero epochs", lambda f: ["--set", "epochs=0"], ["epochs must be positive"]),
    ("zero budget", lambda f: ["--budget", "images=0"], ["positive"]),
    ("negative budget", lambda f: ["--budget", "seconds=-5"], ["positive"]),
    ("unknown budget", lambda f: ["--budget", "hours=2"], ["--budget takes"]),
    ("negative budget through --set", lambda f: ["--set", "max_teacher_passes=-1"], ["max_teacher_passes"]),
    ("image size the model cannot take", lambda f: ["--student", "vit_tiny_patch16_224"],
     ["cannot take 3x16x16 images"]),
]


@pytest.mark.parametrize("case,extra,fragments", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_exit_2_and_keeps_results(case, extra, fragments, workspace, tiny_store):
    root, files = workspace
    before = _fingerprint(root / "out")
    args = ["run", "--method", "deepinversion", *TINY_CLI, "--teacher-store", str(tiny_store),
            "--output", str(root / "out")]
    # later options win in click, so each case's arguments override the tiny defaults
    result = CliRunner().invoke(cli, args + [str(a) for a in extra(files)])
    assert_user_error(result, *fragments)
    assert _fingerprint(root / "out") == before
    assert sorted(p.name for p in (root / "out").iterdir()) == ["done"]


def test_output_folder_holding_another_run(workspace, tiny_store):
    root, _ = workspace
    before = _fingerprint(root / "out")
    result = CliRunner().invoke(cli, ["run", "--method", "deepinversion", *TINY_CLI, "--seed", "1",
                                      "--teacher-store", str(tiny_store), "--output", str(root / "out"),
                                      "--name", "done"])
    assert_user_error(result, "holds a different run", "seed")
    assert _fingerprint(root / "out") == before


def test_output_folder_that_cannot_be_written(workspace, tiny_store):
    root, _ = workspace
    result = CliRunner().invoke(cli, ["run", "--method", "deepinversion", *TINY_CLI, "--teacher-store",
                                      str(tiny_store), "--output", str(root / "a_file" / "runs")])
    assert_user_error(result, "cannot write to")


@pytest.fixture
def offline_fashion_mnist(tmp_path, monkeypatch):
    """Point the Fashion-MNIST loader at an empty folder and make torchvision's download fail as offline."""
    import torchvision.datasets

    folder = tmp_path / "debian"
    folder.mkdir()
    monkeypatch.setattr(data, "DEBIAN_FASHION_MNIST", folder)
    monkeypatch.setenv("DFKD_BENCH_DATA", str(tmp_path / "data"))

    def no_network(*args, **kwargs):
        raise urllib.error.URLError("no route to host")

    monkeypatch.setattr(torchvision.datasets, "FashionMNIST", no_network)
    return folder


def _fmnist_run(tmp_path: Path) -> list[str]:
    return ["run", "--method", "deepinversion", "--dataset", "fashion-mnist", "--teacher", "wrn16_2",
            "--teacher-store", str(SHIPPED_TEACHERS), "--output", str(tmp_path / "out")]


def test_dataset_files_missing(offline_fashion_mnist, tmp_path):
    result = CliRunner().invoke(cli, _fmnist_run(tmp_path))
    assert_user_error(result, "Fashion-MNIST not found", "t10k-images-idx3-ubyte.gz")
    assert not (tmp_path / "out").exists()


def test_dataset_files_corrupt(offline_fashion_mnist, tmp_path):
    with gzip.open(offline_fashion_mnist / "t10k-images-idx3-ubyte.gz", "wb") as fh:
        fh.write(bytes([0, 0, 8, 3]) + (10000).to_bytes(4, "big") + (28).to_bytes(4, "big") * 2 + b"\0" * 100)
    with gzip.open(offline_fashion_mnist / "t10k-labels-idx1-ubyte.gz", "wb") as fh:
        fh.write(bytes([0, 0, 8, 1]) + (10000).to_bytes(4, "big") + b"\0" * 10000)
    result = CliRunner().invoke(cli, _fmnist_run(tmp_path))
    assert_user_error(result, "truncated or corrupt")
    assert not (tmp_path / "out").exists()
