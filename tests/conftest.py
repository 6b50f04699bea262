"""Shared fixtures: a tiny synthetic dataset and a tiny teacher, so end-to-end runs take seconds."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dfkd_bench.config import resolve_config
from dfkd_bench.data import DatasetSpec
from dfkd_bench.engine import Runner
from dfkd_bench.registry import DATASETS, PRESETS, SYNTHESIZERS, load_plugins, register_preset
from dfkd_bench.teachers import TeacherTrainConfig, train_teacher

# The tests' tensors are tiny: a second intra-op thread only spin-waits, and on a shared machine
# that costs many times the CPU time. One thread also makes floats bitwise-comparable across the
# processes of the kill-and-resume test.
torch.set_num_threads(1)

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


@pytest.fixture(scope="session")
def tiny_store(tmp_path_factory) -> Path:
    """A teacher store holding a briefly trained wrn16_1 for the tiny dataset."""
    store = tmp_path_factory.mktemp("teachers")
    train_teacher(TINY_SPEC, "wrn16_1", TeacherTrainConfig(epochs=2, batch_size=64, lr=0.05), store)
    return store


def tiny_runner(method: str, run_dir: Path, store: Path, overrides: dict | None = None,
                preset: str = "quick") -> Runner:
    """A Runner for ``method`` on the tiny dataset; ``overrides`` are ``--set`` style keys."""
    values = {**TINY_RUN, **(overrides or {})}
    cfg, method_cfg, loss_cfg = resolve_config(method, preset, values)
    return Runner(cfg, method_cfg, loss_cfg, run_dir, store)


@pytest.fixture
def register_toy():
    """Register test-only methods (with a 'quick' preset); unregistered afterwards."""
    names = []

    def register(cls):
        SYNTHESIZERS.register(cls)
        register_preset(cls.name, "quick", {})
        names.append(cls.name)
        return cls.name

    yield register
    for name in names:
        SYNTHESIZERS.unregister(name)
        PRESETS.unregister(f"{name}:quick")
