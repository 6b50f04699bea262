"""Shared test helpers: a tiny synthetic dataset (registered on import, so `--plugin helpers` gives a
command-line run the dataset), tiny run settings, a Runner builder, assertions for user errors and
numeric effects, and a fake CIFAR folder. The pytest fixtures built on them are in conftest.py."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from dfkd_bench.config import resolve_config
from dfkd_bench.data import DatasetSpec
from dfkd_bench.engine import Runner
from dfkd_bench.registry import DATASETS, load_plugins

# The tests' tensors are tiny: a second intra-op thread only spin-waits, and on a shared machine
# that costs many times the CPU time. One thread also makes floats bitwise-comparable across the
# processes of the kill-and-resume test.
torch.set_num_threads(1)

# the teachers committed with the project (teachers/<dataset>/<arch>.pt + .json)
SHIPPED_TEACHERS = Path(__file__).resolve().parents[1] / "teachers"

TINY = "tiny"
TINY_SHAPE = (3, 16, 16)
TINY_CLASSES = 4


def _tiny_loader(split: str, root: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """Class-dependent blobs of colour, so a teacher can learn something in a few steps."""
    g = torch.Generator().manual_seed(0 if split == "train" else 1)
    n = 256 if split == "train" else 128
    labels = torch.arange(n) % TINY_CLASSES
    base = torch.rand(TINY_CLASSES, *TINY_SHAPE, generator=torch.Generator().manual_seed(42))
    noise = torch.rand(n, *TINY_SHAPE, generator=g) * 0.5
    images = ((base[labels] * 0.5 + noise) * 255).clamp(0, 255).to(torch.uint8)
    return images, labels


TINY_SPEC = DatasetSpec(TINY, TINY_CLASSES, TINY_SHAPE[0], TINY_SHAPE[1], (0.5, 0.5, 0.5), (0.25, 0.25, 0.25),
                        _tiny_loader)
if TINY not in DATASETS:
    DATASETS.register(TINY_SPEC, name=TINY)
load_plugins()

# Settings that make any method's run take a few seconds on the tiny dataset.
TINY_RUN = {"epochs": 2, "ep_steps": 2, "kd_steps": 1, "batch_size": 8, "synth_batch_size": 8,
            "eval_batch_size": 64, "dataset": TINY, "teacher": "wrn16_1", "student": "wrn16_1"}


# The same settings as command-line arguments.
TINY_CLI = ["--dataset", TINY, "--teacher", "wrn16_1", "--student", "wrn16_1",
            "--set", "epochs=2", "--set", "ep_steps=2", "--set", "kd_steps=1", "--set", "batch_size=8",
            "--set", "synth_batch_size=8", "--set", "method.g_steps=2"]


def assert_user_error(result, *fragments: str) -> str:
    """Exit code 2, one line on stderr starting with 'error:', no traceback; returns that line."""
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    assert isinstance(result.exception, SystemExit)  # not an exception that escaped the command
    assert "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


# ---------------------------------------------------------------- numeric effects

# Where assert_effect appends what it compared (benchmarks/effect_margins.py sets it).
EFFECTS_LOG = "DFKD_BENCH_EFFECTS"


def assert_effect(larger, smaller, what: str) -> None:
    """Assert ``larger > smaller``: the verdict of a test marked ``numeric``.

    Such a test asserts an effect measured on a short seeded run, so another CPU's float kernels
    move both sides a little; its settings must keep ``larger - smaller`` many times that move.
    With ``$DFKD_BENCH_EFFECTS`` naming a file, each call appends one JSON line (the test id,
    ``what``, both values), which ``benchmarks/effect_margins.py`` compares across kernel paths.
    """
    larger, smaller = float(larger), float(smaller)
    log = os.environ.get(EFFECTS_LOG)
    if log:
        test = os.environ.get("PYTEST_CURRENT_TEST", "?").rsplit(" ", 1)[0]
        with open(log, "a") as fh:
            fh.write(json.dumps({"test": test, "what": what, "larger": larger, "smaller": smaller}) + "\n")
    assert larger > smaller, f"{what}: {larger!r} is not above {smaller!r}"


def tiny_runner(method: str, run_dir: Path, store: Path, overrides: dict | None = None,
                preset: str = "quick") -> Runner:
    """A Runner for ``method`` on the tiny dataset; ``overrides`` are ``--set`` style keys."""
    values = {**TINY_RUN, **(overrides or {})}
    cfg, method_cfg, loss_cfg = resolve_config(method, preset, values)
    return Runner(cfg, method_cfg, loss_cfg, run_dir, store)


# ---------------------------------------------------------------- a fake CIFAR folder

FAKE_CIFAR_TRAIN, FAKE_CIFAR_TEST = 40, 20  # images per split, in each dataset


def _cifar_entry(images, labels, label_key: str, extra: dict) -> dict:
    """One batch file's dict, as the CIFAR 'python version' holds it: rows of R, then G, then B planes."""
    return {"data": images.reshape(len(images), -1), label_key: [int(v) for v in labels],
            "filenames": [f"fake_{i}.png" for i in range(len(images))], **extra}


def write_fake_cifar(root: Path, seed: int = 0) -> dict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """Random 32x32x3 images in torchvision's on-disk layouts of CIFAR-10 and CIFAR-100 below ``root``.

    Returns ``{dataset: {split: (images (N, 3, 32, 32) uint8, labels)}}``, what a reader must give back.
    """
    import pickle

    g = torch.Generator().manual_seed(seed)
    written: dict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]] = {}

    def draw(n: int, classes: int) -> tuple[torch.Tensor, torch.Tensor]:
        return (torch.randint(0, 256, (n, 3, 32, 32), generator=g, dtype=torch.uint8),
                torch.randint(0, classes, (n,), generator=g))

    def dump(path: Path, obj: dict) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "wb") as fh:
            pickle.dump(obj, fh, protocol=2)  # the protocol the published files use

    folder = root / "cifar-10-batches-py"
    train, test = draw(FAKE_CIFAR_TRAIN, 10), draw(FAKE_CIFAR_TEST, 10)
    per_batch = FAKE_CIFAR_TRAIN // 5
    for i in range(5):
        part = slice(i * per_batch, (i + 1) * per_batch)
        dump(folder / f"data_batch_{i + 1}", _cifar_entry(train[0][part].numpy(), train[1][part], "labels",
                                                           {"batch_label": f"training batch {i + 1} of 5"}))
    dump(folder / "test_batch", _cifar_entry(test[0].numpy(), test[1], "labels", {"batch_label": "testing batch"}))
    dump(folder / "batches.meta", {"label_names": [f"class{i}" for i in range(10)],
                                   "num_cases_per_batch": per_batch, "num_vis": 3072})
    written["cifar10"] = {"train": train, "test": test}

    folder = root / "cifar-100-python"
    train, test = draw(FAKE_CIFAR_TRAIN, 100), draw(FAKE_CIFAR_TEST, 100)
    for split, (images, labels) in (("train", train), ("test", test)):
        dump(folder / split, _cifar_entry(images.numpy(), labels, "fine_labels",
                                          {"coarse_labels": [int(v) // 5 for v in labels], "batch_label": split}))
    dump(folder / "meta", {"fine_label_names": [f"fine{i}" for i in range(100)],
                           "coarse_label_names": [f"coarse{i}" for i in range(20)]})
    written["cifar100"] = {"train": train, "test": test}
    return written
