"""Class-folder datasets read lazily: ImageNet's layout (generated: 1000 class folders, a few small JPEGs),
a folder a user declares with `dataset add`, timm's pretrained teachers stored from a local weights file, and
the one-line errors for what is missing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import timm
import torch
from click.testing import CliRunner
from helpers import assert_user_error
from PIL import Image

from dfkd_bench.cli import cli
from dfkd_bench.data import TensorSplit, declare_dataset, get_dataset
from dfkd_bench.errors import DfkdError, UnknownNameError
from dfkd_bench.teachers import TeacherTrainConfig, import_pretrained, load_teacher, train_teacher

TINY_TIMM = "mobilenetv3_small_050"  # a timm ImageNet model small enough for CPU tests at 224 px
IMAGED = 12  # ImageNet classes that hold an image in each split (the other 988 folders are empty)


def _jpeg(path: Path, g: torch.Generator, size: tuple[int, int], mode: str = "RGB") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = torch.randint(0, 256, (size[1], size[0], 3), generator=g, dtype=torch.uint8).numpy()
    image = Image.fromarray(pixels, "RGB")
    (image.convert(mode) if mode != "RGB" else image).save(path, "JPEG")


@pytest.fixture(scope="module")
def imagenet_root(tmp_path_factory) -> Path:
    """data/imagenet/{train,val}/<wnid>/: 1000 class folders, images in the first IMAGED of them, of odd sizes."""
    root = tmp_path_factory.mktemp("imagenet_data")
    g = torch.Generator().manual_seed(0)
    for split in ("train", "val"):
        for c in range(1000):
            folder = root / "imagenet" / split / f"n{c:08d}"
            folder.mkdir(parents=True)
            if c < IMAGED:
                _jpeg(folder / f"{split}_{c}.JPEG", g, (40 + c, 30), "L" if c == 2 else "RGB")
    return root


@pytest.fixture
def imagenet(imagenet_root, monkeypatch) -> Path:
    monkeypatch.setenv("DFKD_BENCH_DATA", str(imagenet_root))
    monkeypatch.setenv("DFKD_BENCH_WORKERS", "0")
    return imagenet_root


@pytest.fixture(scope="module")
def tiny_weights(tmp_path_factory) -> Path:
    """A state dict of timm's TINY_TIMM (1000 classes), standing in for downloaded pretrained weights."""
    path = tmp_path_factory.mktemp("weights") / f"{TINY_TIMM}.pth"
    torch.manual_seed(1)
    torch.save(timm.create_model(TINY_TIMM, pretrained=False).state_dict(), path)
    return path


def test_imagenet_is_read_lazily_in_folder_order_at_224_pixels(imagenet):
    spec = get_dataset("imagenet")
    assert spec.lazy and (spec.num_classes, spec.image_shape) == (1000, (3, 224, 224))
    test = spec.split("test")
    assert len(test) == IMAGED and not isinstance(test, TensorSplit)
    batches = list(test.batches(5))
    assert [len(y) for _, y in batches] == [5, 5, 2]
    images = torch.cat([x for x, _ in batches])
    assert images.dtype == torch.uint8 and images.shape == (IMAGED, 3, 224, 224)
    assert torch.cat([y for _, y in batches]).tolist() == list(range(IMAGED))  # sorted wnids, empty ones kept
    x, y = spec.load("test")  # small enough: decoded whole into memory, the same pixels
    assert torch.equal(x, images) and y.tolist() == list(range(IMAGED))
    shard = torch.cat([b for _, b in test.batches(4, rank=1, world=3)])
    assert shard.tolist() == list(range(1, IMAGED, 3))  # a rank's shard, as data-parallel evaluation reads it
    assert spec.names()[:2] == ("n00000000", "n00000001")


def test_worker_processes_read_the_same_batches(imagenet, monkeypatch):
    spec = get_dataset("imagenet")
    alone = [x for x, _ in spec.split("test").batches(4)]
    monkeypatch.setenv("DFKD_BENCH_WORKERS", "2")
    workers = [x for x, _ in spec.split("test").batches(4)]
    assert all(torch.equal(a, b) for a, b in zip(alone, workers)) and len(alone) == len(workers)


def test_training_reads_random_resized_crops(imagenet):
    spec = get_dataset("imagenet")

    def read() -> torch.Tensor:
        torch.manual_seed(0)  # without workers the transforms draw from the global generator (seeded by a run)
        reader = spec.split("train", train=True).batches(6, generator=torch.Generator().manual_seed(0))
        return torch.cat([x for x, _ in reader])

    first, again, plain = read(), read(), spec.load("train")[0]
    assert first.shape == plain.shape == (IMAGED, 3, 224, 224)
    assert torch.equal(first, again)  # seeded: the same order and crops
    assert not torch.equal(first, plain)


def test_a_missing_imagenet_is_one_line_naming_the_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("DFKD_BENCH_DATA", str(tmp_path))
    with pytest.raises(DfkdError, match=r"no folder .*imagenet/val .*put ImageNet's train/ and val/ class folders"):
        get_dataset("imagenet").split("test")


def test_a_pretrained_teacher_comes_from_a_local_weights_file_through_timm(imagenet, tiny_weights, tmp_path):
    spec = get_dataset("imagenet")
    meta = import_pretrained(spec, f"timm:{TINY_TIMM}", tmp_path, str(tiny_weights))
    cfg = timm.create_model(TINY_TIMM, pretrained=False).pretrained_cfg
    assert meta["normalization"] == {"mean": list(cfg["mean"]), "std": list(cfg["std"])}
    assert meta["pretrained"]["file"] == str(tiny_weights.resolve()) and meta["test_accuracy"] is not None
    teacher, loaded = load_teacher(spec, f"timm:{TINY_TIMM}", tmp_path)
    expected = torch.load(tiny_weights)
    assert all(torch.equal(teacher.state_dict()[k], v) for k, v in expected.items())
    assert loaded["sha256"] == meta["sha256"]
    with pytest.raises(DfkdError, match="already holds"):
        import_pretrained(spec, f"timm:{TINY_TIMM}", tmp_path, str(tiny_weights))
    with pytest.raises(DfkdError, match="name the teacher timm:<model>"):
        import_pretrained(spec, "wrn16_1", tmp_path / "other", str(tiny_weights))
    with pytest.raises(DfkdError, match="classify 1000 classes; fashion-mnist has 10"):
        import_pretrained(get_dataset("fashion-mnist"), f"timm:{TINY_TIMM}", tmp_path / "fm", str(tiny_weights))


def test_offline_without_a_weights_file_is_one_line(imagenet, tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # no network retries in the test
    result = CliRunner().invoke(cli, ["teacher", "pretrained", f"timm:{TINY_TIMM}", "--store", str(tmp_path)])
    assert_user_error(result, "could not fetch the pretrained weights", "teacher_weights=FILE")
    missing = CliRunner().invoke(cli, ["run", "--method", "deepinversion", "--dataset", "imagenet", "--teacher",
                                       f"timm:{TINY_TIMM}", "--teacher-store", str(tmp_path)])
    assert_user_error(missing, "teacher_pretrained=true")  # never trains an ImageNet teacher on its own


def _imagenet_run(method: str, teacher: str, student: str, weights: Path, tmp_path: Path, *extra: str):
    args = ["run", "--method", method, "--dataset", "imagenet", "--teacher", teacher, "--student", student,
            "--teacher-store", str(tmp_path / "teachers"), "--output", str(tmp_path / "runs"),
            "--set", "teacher_pretrained=true", "--set", f"teacher_weights={weights}",
            "--set", "epochs=1", "--set", "ep_steps=2", "--set", "kd_steps=1", "--set", "batch_size=2",
            "--set", "synth_batch_size=2", "--set", "method.g_steps=1", *extra]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, (result.output, result.exception)
    (summary_path,) = (tmp_path / "runs").glob("*/summary.json")
    return json.loads(summary_path.read_text())


def test_a_run_on_imagenet_with_a_pretrained_timm_teacher_ends(imagenet, tiny_weights, tmp_path):
    summary = _imagenet_run("deepinversion", f"timm:{TINY_TIMM}", f"timm:{TINY_TIMM}", tiny_weights, tmp_path)
    assert summary["status"] == "complete" and summary["epochs_done"] == 1
    side = json.loads((tmp_path / "teachers" / "imagenet" / f"{TINY_TIMM}.json").read_text())
    assert summary["teacher_sha256"] == side["sha256"]
    assert summary["normalization"] == side["normalization"]


@pytest.mark.slow
def test_nayer_on_imagenet_with_timm_resnet50(imagenet, tmp_path):
    weights = tmp_path / "resnet50.pth"
    torch.save(timm.create_model("resnet50", pretrained=False).state_dict(), weights)
    summary = _imagenet_run("nayer", "timm:resnet50", "timm:resnet18", weights, tmp_path,
                            "--set", "method.label_embeddings=onehot", "--set", "method.gwp_loops=1")
    assert summary["status"] == "complete" and summary["teacher"] == "timm:resnet50"


# ---------------------------------------------------------------- folders declared by the user

@pytest.fixture
def pets(tmp_path, monkeypatch) -> Path:
    """Three classes of odd-sized JPEGs in train/ and val/, and a data root for the declaration."""
    monkeypatch.setenv("DFKD_BENCH_DATA", str(tmp_path / "data"))
    monkeypatch.setenv("DFKD_BENCH_WORKERS", "0")
    g = torch.Generator().manual_seed(0)
    root = tmp_path / "pets"
    for split, n in (("train", 12), ("val", 4)):
        for c, name in enumerate(("cat", "dog", "fish")):
            for i in range(n):
                _jpeg(root / split / name / f"{i}.jpg", g, (36 + i, 40 + c))
    return root


def test_a_declared_folder_dataset_trains_a_teacher_and_runs(pets, tmp_path):
    result = CliRunner().invoke(cli, ["dataset", "add", "pets", "--root", str(pets), "--image-size", "32",
                                      "--mean", "0.5,0.5,0.5", "--std", "0.25,0.25,0.25"])
    assert result.exit_code == 0, result.output
    spec = get_dataset("pets")
    assert (spec.num_classes, spec.image_shape, spec.lazy) == (3, (3, 32, 32), True)
    assert spec.names() == ("cat", "dog", "fish")
    listed = CliRunner().invoke(cli, ["dataset", "list"], terminal_width=200)
    assert "pets" in listed.output and "declared" in listed.output and "imagenet" in listed.output
    store = tmp_path / "teachers"
    meta = train_teacher(spec, "wrn16_1", TeacherTrainConfig(epochs=1, batch_size=8), store)
    again = train_teacher(spec, "wrn16_1", TeacherTrainConfig(epochs=1, batch_size=8), tmp_path / "again")
    assert meta["sha256"] == again["sha256"]  # seeded lazy training is reproducible
    assert meta["normalization"] == {"mean": [0.5] * 3, "std": [0.25] * 3}
    for method in ("cmi", "kd-real"):
        run = CliRunner().invoke(cli, ["run", "--method", method, "--dataset", "pets", "--teacher", "wrn16_1",
                                       "--student", "wrn16_1", "--teacher-store", str(store), "--output",
                                       str(tmp_path / "runs"), "--set", "epochs=1", "--set", "ep_steps=2",
                                       "--set", "kd_steps=1", "--set", "batch_size=4", "--set", "synth_batch_size=4"])
        assert run.exit_code == 0, (method, run.output, run.exception)


def test_bad_declarations_are_refused_in_one_line(pets, tmp_path):
    with pytest.raises(DfkdError, match="built-in dataset"):
        declare_dataset("cifar10", pets, 32, (0.5,), (0.5,))
    with pytest.raises(DfkdError, match="1 .grayscale. or 3 .RGB. values"):
        declare_dataset("pets", pets, 32, (0.5, 0.5), (0.5, 0.5))
    with pytest.raises(DfkdError, match="no folder .*test"):
        declare_dataset("pets", pets, 32, (0.5,), (0.5,), test_dir="test")
    (pets / "val" / "bird").mkdir()
    result = CliRunner().invoke(cli, ["dataset", "add", "pets", "--root", str(pets), "--image-size", "32",
                                      "--mean", "0.5", "--std", "0.5"])
    assert_user_error(result, "different classes", "bird")
    with pytest.raises(UnknownNameError):
        get_dataset("pets")  # nothing was declared


def test_a_grayscale_folder_dataset_reads_one_channel(pets):
    declare_dataset("gray-pets", pets, 16, (0.5,), (0.5,), resize=20)
    x, y = get_dataset("gray-pets").load("train")
    assert x.shape == (36, 1, 16, 16) and y.tolist() == [0] * 12 + [1] * 12 + [2] * 12
