"""The registries: registration forms, duplicate and unknown-name errors, presets, plugins."""

from __future__ import annotations

import importlib
import pkgutil
import sys
import textwrap

import pytest
from click.testing import CliRunner

import dfkd_bench.methods
from dfkd_bench import registry
from dfkd_bench.cli import cli
from dfkd_bench.config import resolve_config
from dfkd_bench.errors import DfkdError, UnknownNameError
from dfkd_bench.registry import (
    LOSSES,
    PRESETS,
    SYNTHESIZERS,
    Registry,
    get_preset,
    load_plugins,
    presets_for,
    register_preset,
)

# ---------------------------------------------------------------- registration forms

def test_bare_decorator_uses_the_name_attribute_or_the_class_name():
    reg = Registry("thing")

    @reg.register
    class WithName:
        name = "alpha"

    @reg.register
    class Plain:
        pass

    assert reg.get("alpha") is WithName  # the decorator hands the class back unchanged
    assert reg.get("Plain") is Plain
    assert reg.names() == sorted(["alpha", "Plain"])
    assert "alpha" in reg and "WithName" not in reg
    assert len(reg) == 2


def test_register_with_an_explicit_key_in_every_form():
    reg = Registry("thing")

    @reg.register("beta")
    class B:
        name = "ignored_because_a_key_was_given"

    @reg.register(name="gamma")
    class G:
        pass

    def delta_fn():
        return None

    returned = reg.register(delta_fn, name="delta")
    assert returned is delta_fn
    assert reg.get("beta") is B and reg.get("gamma") is G and reg.get("delta") is delta_fn
    assert "ignored_because_a_key_was_given" not in reg
    assert list(reg) == ["beta", "delta", "gamma"]


def test_duplicate_name_raises_unless_forced_and_same_object_is_idempotent():
    reg = Registry("thing")

    class First:
        name = "dup"

    class Second:
        name = "dup"

    reg.register(First)
    reg.register(First)  # the same object again (a re-import) is not a conflict
    with pytest.raises(KeyError, match="dup.*already registered"):
        reg.register(Second)
    assert reg.get("dup") is First
    reg.register(Second, force=True)
    assert reg.get("dup") is Second


def test_unregister_removes_a_name():
    reg = Registry("thing")
    reg.register(object(), name="x")
    reg.unregister("x")
    assert "x" not in reg
    reg.unregister("x")  # removing twice is harmless


# ---------------------------------------------------------------- unknown names

def test_unknown_name_lists_valid_names_and_close_matches():
    reg = Registry("method")
    for key in ("deepinversion", "cmi", "fast"):
        reg.register(object(), name=key)
    with pytest.raises(UnknownNameError) as info:
        reg.get("deepinversio")
    message = str(info.value)
    assert message.startswith("unknown method 'deepinversio'")
    assert "did you mean 'deepinversion'?" in message
    assert "(valid: cmi, deepinversion, fast)" in message
    # a user error: the CLI turns DfkdError into one line and exit code 2
    assert isinstance(info.value, DfkdError) and info.value.exit_code == 2


def test_unknown_name_without_close_match_still_lists_valid_names():
    reg = Registry("dataset")
    reg.register(object(), name="cifar10")
    with pytest.raises(UnknownNameError) as info:
        reg.get("zzzzzz")
    assert "did you mean" not in str(info.value)
    assert "valid: cifar10" in str(info.value)


def test_real_method_registry_suggests_deepinversion():
    with pytest.raises(UnknownNameError, match=r"did you mean 'deepinversion'\?"):
        SYNTHESIZERS.get("deepinversio")


# ---------------------------------------------------------------- presets

def test_presets_lookup_returns_a_copy():
    assert {"paper", "quick"} <= set(presets_for("deepinversion"))
    quick = get_preset("deepinversion", "quick")
    assert isinstance(quick["method.g_steps"], int)
    quick["method.g_steps"] = -1
    assert get_preset("deepinversion", "quick")["method.g_steps"] != -1  # the registered preset is untouched


def test_register_preset_and_unknown_preset_error():
    register_preset("deepinversion", "unit_test_preset", {"epochs": 3, "method.g_steps": 4})
    try:
        assert "unit_test_preset" in presets_for("deepinversion")
        assert get_preset("deepinversion", "unit_test_preset") == {"epochs": 3, "method.g_steps": 4}
        cfg, method_cfg, _ = resolve_config("deepinversion", "unit_test_preset")
        assert cfg.epochs == 3 and method_cfg.g_steps == 4
    finally:
        PRESETS.unregister("deepinversion:unit_test_preset")
    with pytest.raises(UnknownNameError) as info:
        get_preset("deepinversion", "quik")
    assert "did you mean 'quick'?" in str(info.value)
    assert "paper" in str(info.value)


# ---------------------------------------------------------------- plugins

def test_load_plugins_imports_every_builtin_method_module():
    load_plugins()
    for info in pkgutil.iter_modules(dfkd_bench.methods.__path__):
        if not info.name.startswith("_"):
            assert f"dfkd_bench.methods.{info.name}" in sys.modules
    assert "deepinversion" in SYNTHESIZERS
    assert "kl" in LOSSES


def test_load_plugins_registers_deepinversion_from_scratch(monkeypatch):
    """Registration happens on import: with the module and its registrations gone, load_plugins restores them."""
    module = "dfkd_bench.methods.deepinversion"
    monkeypatch.setattr(registry, "_loaded", set())
    monkeypatch.setattr(SYNTHESIZERS, "_items", {k: v for k, v in SYNTHESIZERS.items() if k != "deepinversion"})
    monkeypatch.setattr(PRESETS, "_items", {k: v for k, v in PRESETS.items() if not k.startswith("deepinversion:")})
    monkeypatch.delitem(sys.modules, module)
    monkeypatch.setattr(dfkd_bench.methods, "deepinversion", dfkd_bench.methods.deepinversion)
    assert "deepinversion" not in SYNTHESIZERS
    load_plugins()
    assert "deepinversion" in SYNTHESIZERS
    assert SYNTHESIZERS.get("deepinversion").__module__ == module
    assert "quick" in presets_for("deepinversion")


PLUGIN_SOURCE = '''
from dataclasses import dataclass

import torch

from dfkd_bench.method import DistillLoss, SynthBatch, Synthesizer
from dfkd_bench.registry import LOSSES, SYNTHESIZERS, register_preset


@SYNTHESIZERS.register
class ToyPluginMethod(Synthesizer):
    name = "toy_plugin_method"
    summary = "toy method from a plugin module"

    @dataclass
    class Config:
        steps: int = 1

    def synthesize(self):
        n = self.ctx.synth_batch_size
        return SynthBatch(torch.rand(n, *self.ctx.image_shape), teacher_passes=n)


@LOSSES.register("toy_plugin_loss")
class ToyPluginLoss(DistillLoss):
    summary = "toy loss from a plugin module"

    @dataclass
    class Config:
        weight: float = 1.0

    def forward(self, s, t, y):
        return {"toy": (s.logits - t.logits).pow(2).mean() * self.cfg.weight}


register_preset("toy_plugin_method", "quick", {"epochs": 1})
'''

PLUGIN_MODULE = "dfkd_bench_test_toy_plugin"


@pytest.fixture
def toy_plugin(tmp_path, monkeypatch):
    """A plugin module on sys.path; everything it registers is removed afterwards."""
    (tmp_path / f"{PLUGIN_MODULE}.py").write_text(textwrap.dedent(PLUGIN_SOURCE))
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.invalidate_caches()
    yield PLUGIN_MODULE
    SYNTHESIZERS.unregister("toy_plugin_method")
    LOSSES.unregister("toy_plugin_loss")
    PRESETS.unregister("toy_plugin_method:quick")
    registry._loaded.discard(PLUGIN_MODULE)
    sys.modules.pop(PLUGIN_MODULE, None)


def test_plugin_module_registers_a_method_and_a_loss(toy_plugin):
    assert "toy_plugin_method" not in SYNTHESIZERS
    load_plugins([toy_plugin])
    assert "toy_plugin_method" in SYNTHESIZERS
    assert "toy_plugin_loss" in LOSSES
    assert presets_for("toy_plugin_method") == ["quick"]
    load_plugins([toy_plugin])  # a second call is a no-op, not a duplicate registration
    cfg, method_cfg, loss_cfg = resolve_config("toy_plugin_method", "quick", {"loss": "toy_plugin_loss",
                                                                                "loss.weight": "2.5"})
    assert cfg.epochs == 1 and method_cfg.steps == 1
    assert cfg.loss == "toy_plugin_loss" and loss_cfg.weight == 2.5


def test_cli_plugin_option_makes_the_method_visible(toy_plugin):
    result = CliRunner().invoke(cli, ["--plugin", toy_plugin, "methods"])
    assert result.exit_code == 0, result.output
    assert "toy_plugin_method" in result.stdout
    assert "toy_plugin_loss" in result.stdout


def test_missing_plugin_module_is_a_one_line_user_error():
    with pytest.raises(DfkdError, match="cannot import plugin 'no_such_dfkd_plugin_module'"):
        load_plugins(["no_such_dfkd_plugin_module"])
    result = CliRunner().invoke(cli, ["--plugin", "no_such_dfkd_plugin_module", "methods"])
    assert result.exit_code == 2
    assert result.stderr.strip().startswith("error: cannot import plugin")
    assert len(result.stderr.strip().splitlines()) == 1
