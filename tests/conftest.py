"""pytest fixtures: a tiny teacher store, test-only methods and a fake CIFAR folder (helpers in helpers.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import TINY_SPEC, write_fake_cifar

from dfkd_bench.registry import PRESETS, SYNTHESIZERS, register_preset
from dfkd_bench.teachers import TeacherTrainConfig, train_teacher


@pytest.fixture(scope="session")
def tiny_store(tmp_path_factory) -> Path:
    """A teacher store holding a briefly trained wrn16_1 for the tiny dataset."""
    store = tmp_path_factory.mktemp("teachers")
    train_teacher(TINY_SPEC, "wrn16_1", TeacherTrainConfig(epochs=2, batch_size=64, lr=0.05), store)
    return store


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


@pytest.fixture(scope="session")
def fake_cifar(tmp_path_factory) -> tuple[Path, dict]:
    """A data root holding the fake CIFAR-10 and CIFAR-100 folders, and what was written to them."""
    root = tmp_path_factory.mktemp("cifar_data")
    return root, write_fake_cifar(root)


@pytest.fixture
def cifar_root(fake_cifar, monkeypatch) -> Path:
    """The fake CIFAR data root, as ``$DFKD_BENCH_DATA`` for this test."""
    monkeypatch.setenv("DFKD_BENCH_DATA", str(fake_cifar[0]))
    return fake_cifar[0]
