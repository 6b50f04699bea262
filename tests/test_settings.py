"""Settings are checked where they are declared: every registered (method, preset) resolves, every
enumerated setting refuses a bad value in one line before anything is loaded, with and without
--dry-run; the loss registry; the one inversion loop; nested timers; plans; the package's imports."""

from __future__ import annotations

import ast
import dataclasses
import pickle
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from helpers import assert_user_error

from dfkd_bench import rundir
from dfkd_bench.api import plan_run
from dfkd_bench.cli import cli
from dfkd_bench.errors import DfkdError
from dfkd_bench.inversion import invert
from dfkd_bench.method import DistillLoss
from dfkd_bench.registry import LOSSES, SYNTHESIZERS, presets_for
from dfkd_bench.rundir import Counters
from dfkd_bench.settings import LossSettings, MethodSettings, allowed_values, at_least, check_fields, choice

PACKAGE = Path(__file__).resolve().parents[1] / "dfkd_bench"


def _enumerated() -> list[tuple[str, str, tuple[str, ...]]]:
    """(method, method.<field>, allowed values) for every enumerated setting of every method."""
    out = []
    for name, cls in SYNTHESIZERS.items():
        for f in dataclasses.fields(cls.Config):
            allowed = allowed_values(cls.Config, f.name)
            if allowed:
                out.append((name, f"method.{f.name}", allowed))
    return out


ENUMERATED = _enumerated()


def test_the_enumerated_settings_are_found():
    keys = {(m, k) for m, k, _ in ENUMERATED}
    assert {("deepinversion", "method.adv_mode"), ("kd-noise", "method.noise"), ("cmi", "method.features"),
            ("fast_meta", "method.meta"), ("dafl", "method.generator"), ("dfad", "method.generator"),
            ("zskt", "method.generator")} <= keys


@pytest.mark.parametrize("method,preset", [(m, p) for m in SYNTHESIZERS.names() for p in presets_for(m)])
def test_every_registered_method_and_preset_resolves(method, preset):
    result = CliRunner().invoke(cli, ["run", "--method", method, "--preset", preset, "--dry-run"])
    assert result.exit_code == 0, (result.output, result.exception)
    assert f'"method": "{method}"' in result.stdout and f'"preset": "{preset}"' in result.stdout


@pytest.mark.parametrize("dry_run", [True, False])
@pytest.mark.parametrize("method,key,allowed", ENUMERATED, ids=[f"{m}-{k}" for m, k, _ in ENUMERATED])
def test_a_bad_enumerated_value_is_one_line_before_anything_loads(method, key, allowed, dry_run, tmp_path):
    # an empty teacher store: had the run got as far as the teacher, the error would name the teacher instead
    args = ["run", "--method", method, "--set", f"{key}=bogus", "--output", str(tmp_path / "runs"),
            "--teacher-store", str(tmp_path / "empty-store"), "--no-train-teacher"]
    result = CliRunner().invoke(cli, args + (["--dry-run"] if dry_run else []))
    assert_user_error(result, f"{key} must be one of {', '.join(allowed)}, got 'bogus'")
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("dry_run", [True, False])
@pytest.mark.parametrize("args,fragment", [
    (["--method", "deepinversion", "--set", "method.adv_mode=foo"], "method.adv_mode must be one of js, masked"),
    (["--method", "kd-noise", "--set", "method.noise=foo"], "method.noise must be one of gaussian, uniform"),
    (["--method", "cmi", "--set", "method.bank_size=0"], "method.bank_size must be a finite number >= 1, got 0"),
    (["--method", "fast", "--set", "method.g_steps=0"], "method.g_steps must be a finite number >= 1"),
    (["--method", "cmi", "--set", "method.local_scale=0.5,0.2"], "method.local_scale must be two areas"),
    (["--method", "nayer", "--set", "method.label_embeddings=/no/such/file.pt"], "no file /no/such/file.pt"),
    (["--method", "csd", "--set", "loss.fea=-1"], "loss.fea must be a finite, non-negative number"),
])
def test_the_issues_bad_settings_end_in_one_line(args, fragment, dry_run, tmp_path):
    result = CliRunner().invoke(cli, ["run", *args, "--teacher-store", str(tmp_path), "--no-train-teacher",
                                      *(["--dry-run"] if dry_run else [])])
    assert_user_error(result, fragment)


def test_a_preset_setting_the_chosen_loss_lacks_is_reported_not_dropped_silently():
    result = CliRunner().invoke(cli, ["run", "--method", "csd", "--preset", "paper", "--loss", "kl", "--dry-run"])
    assert result.exit_code == 0, result.output
    assert "note: preset 'paper' sets loss.fea=30.0, which loss 'kl' does not have: not applied" in result.stderr
    assert '"loss": "kl"' in result.stdout
    plain = CliRunner().invoke(cli, ["run", "--method", "csd", "--preset", "paper", "--dry-run"])
    assert "note:" not in plain.stderr  # its own loss takes every preset key


def test_deepinversion_says_what_it_returns():
    summary = SYNTHESIZERS.get("deepinversion").summary
    assert "last iterate" in summary and "keep_best" in summary


# ---------------------------------------------------------------- the Config bases

def test_a_subclass_that_only_changes_a_default_keeps_the_base_bound_and_choices():
    @dataclasses.dataclass
    class Base(MethodSettings):
        steps: int = at_least(1, default=5)
        mode: str = choice("a", "b")

    @dataclasses.dataclass
    class Child(Base):
        steps: int = 7
        mode: str = "b"

    assert Child().steps == 7
    with pytest.raises(DfkdError, match=r"method.steps must be a finite number >= 1, got 0"):
        Child(steps=0)
    with pytest.raises(DfkdError, match=r"method.mode must be one of a, b, got 'c'"):
        Child(mode="c")
    assert allowed_values(Child, "mode") == ("a", "b") and allowed_values(Child, "steps") is None


def test_a_plugins_plain_dataclass_gets_the_same_field_checks():
    @dataclasses.dataclass
    class Plain:
        weight: float = 1.0
        sizes: tuple[float, ...] = (1.0, 2.0)

    check_fields(Plain(), "loss")
    with pytest.raises(DfkdError, match=r"loss.weight must be a finite, non-negative number, got nan"):
        check_fields(Plain(weight=float("nan")), "loss")
    with pytest.raises(DfkdError, match=r"loss.sizes must be a finite, non-negative number, got -2.0"):
        check_fields(Plain(sizes=(1.0, -2.0)), "loss")


@pytest.mark.parametrize("name", LOSSES.names())
def test_every_registered_loss_is_a_loss_with_checked_settings(name):
    cls = LOSSES.get(name)
    assert issubclass(cls, DistillLoss) and cls.name == name and cls.summary
    assert issubclass(cls.Config, LossSettings) and dataclasses.is_dataclass(cls.Config)
    cls.Config()  # the defaults pass their own checks
    for f in dataclasses.fields(cls.Config):
        if isinstance(f.default, float):
            with pytest.raises(DfkdError, match=f"loss.{f.name} must be"):
                cls.Config(**{f.name: -1.0})
    listed = CliRunner().invoke(cli, ["methods"])
    assert name in listed.stdout


@pytest.mark.parametrize("name", SYNTHESIZERS.names())
def test_every_registered_method_declares_checked_settings(name):
    cls = SYNTHESIZERS.get(name)
    assert issubclass(cls.Config, MethodSettings)
    cls.Config()


# ---------------------------------------------------------------- the one inversion loop

def test_invert_keeps_the_lowest_loss_batch_measured_before_its_update():
    p = torch.nn.Parameter(torch.tensor([3.0]))
    opt = torch.optim.SGD([p], lr=1.0)
    targets = iter([2.0, 0.5, 1.0, 4.0])  # the loss of each step; the 2nd is the lowest
    events = []

    def forward():
        step = events.count("forward")
        events.append("forward")
        images = torch.full((1,), float(step))  # "images" that name their step
        value = next(targets)
        return images, {"a": p.sum() * 0 + value / 2, "b": p.sum() * 0 + value / 2}

    run = invert(opt, 4, forward, on_best=lambda: events.append("best"),
                 after_backward=lambda: events.append("backward"), after_step=lambda: events.append("step"))
    assert run.curve == [2.0, 0.5, 1.0, 4.0]
    assert run.best.item() == 1.0  # the images of step 1 (0-based), whose loss was the lowest
    assert run.last_terms == {"a": 2.0, "b": 2.0}
    assert events[:5] == ["forward", "best", "backward", "step", "forward"]
    assert events.count("best") == 2 and events.count("step") == 4
    assert torch.equal(run.kept, run.best)
    last = invert(torch.optim.SGD([p], lr=1.0), 2, lambda: (p.detach() + 7, {"a": p.sum()}), keep_best=False)
    assert last.best is None and torch.equal(last.kept, last.last_images)


# ---------------------------------------------------------------- timers

def test_a_timer_inside_another_pauses_it(monkeypatch):
    clock = iter([0.0, 1.0, 3.0, 10.0, 10.0, 14.0])
    monkeypatch.setattr(rundir.time, "time", lambda: next(clock))
    c = Counters()
    with c.timing("distill_seconds"):  # 0
        with c.timing("synth_seconds"):  # 1 .. 3: 2 s of synthesis inside the student step
            pass
    # the outer block ends at 10: 1 s before the inner block and 7 s after it
    assert (c.synth_seconds, c.distill_seconds) == (2.0, 8.0)
    with c.timing("eval_seconds"):  # 10 .. 14
        pass
    assert c.eval_seconds == 4.0


def test_counters_checkpoint_the_sessions_time_so_far(monkeypatch):
    now = [100.0]
    monkeypatch.setattr(rundir.time, "time", lambda: now[0])
    c = Counters(elapsed=5.0)
    c.start_session()
    now[0] = 112.0
    state = c.state_dict()
    assert state["elapsed"] == 17.0 and not any(k.startswith("_") for k in state)
    resumed = Counters()
    resumed.load_state_dict(state)
    assert resumed.elapsed == 17.0
    with pytest.raises(KeyError):
        resumed.load_state_dict({"no_such_counter": 1})


# ---------------------------------------------------------------- plans and the package

def test_a_plan_is_plain_picklable_data_that_rebuilds_its_settings(tmp_path):
    plan = plan_run("cmi", "quick", {"method.bank_size": "64"}, output=tmp_path, seed=3, student="wrn16_1")
    again = pickle.loads(pickle.dumps(plan))
    assert again == plan and again.run_dir == tmp_path / "fashion-mnist-wrn16_2-wrn16_1-cmi-quick-s3"
    assert again.method_config() == plan.method_config() and again.method_config().bank_size == 64
    assert again.student_reason == "as given"
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.run_dir = tmp_path


def _imports(path: Path) -> set[str]:
    """The package modules ``path`` imports, at module level or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1:
                found |= {node.module.split(".")[0]} if node.module else {a.name for a in node.names}
            elif node.module and node.module.startswith("dfkd_bench."):
                found.add(node.module.split(".")[1])
    return found


def test_the_package_has_no_import_cycle_and_the_cli_holds_no_run_logic():
    modules = {p.stem: p for p in PACKAGE.glob("*.py")}
    graph = {name: _imports(path) & set(modules) - {name} for name, path in modules.items()}

    def reaches(start: str, goal: str, seen: set[str]) -> bool:
        return any(n == goal or (n not in seen and reaches(n, goal, seen | {n})) for n in graph[start])

    cycles = sorted(name for name in graph if reaches(name, name, set()))
    assert not cycles, f"modules on an import cycle: {cycles}"
    # the Ray backend ships plans and calls the library; the command line never builds a Runner itself
    assert "cli" not in graph["backends"] and "api" in graph["backends"]
    assert "engine" not in graph["cli"] and "api" in graph["cli"]


# ---------------------------------------------------------------- what a method uses besides the teacher

def test_side_information_says_what_each_method_uses_besides_the_teacher():
    from dfkd_bench.results import side_information

    assert side_information({"method": "deepinversion", "method_cfg": {}}) == "none"
    assert side_information({"method": "kd-real"}) == "real training images and labels"
    assert "text encoder" in side_information({"method": "nayer", "method_cfg": {"label_embeddings": "text"}})
    assert side_information({"method": "nayer", "method_cfg": {"label_embeddings": "onehot"}}) == "none"
    assert side_information({"method": "no-such-method"}) == "?"
    listed = CliRunner().invoke(cli, ["methods"]).stdout
    assert "uses besides the teacher" in listed and "real training images" in listed


def test_a_class_variable_of_the_settings_base_is_not_a_setting():
    result = CliRunner().invoke(cli, ["run", "--method", "kd-noise", "--set", "method.scope=x", "--dry-run"])
    assert_user_error(result, "unknown setting of method kd-noise 'scope' (valid: noise)")
