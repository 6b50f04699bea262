"""Fast and Fast-meta: a shared generator that is never reset, the meta-update, BN momentum,
warm-up, the scheduled first-layer reset and checkpointable state, on the tiny fixtures."""

from __future__ import annotations

import gc
import io
import json
import weakref

import pytest
import torch
from helpers import assert_effect, tiny_runner

from dfkd_bench.config import resolve_config
from dfkd_bench.errors import DfkdError
from dfkd_bench.generator import Generator

NAMES = ("fast", "fast_meta")


def _method(name, tmp_path, store, **overrides):
    return tiny_runner(name, tmp_path / "run", store, overrides).method


def _weights(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.named_parameters()}


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(a[k], b[k]) for k in a)


def _record_round_starts(method) -> list[dict[str, torch.Tensor]]:
    """Spy: the weights of the generator each round starts optimizing."""
    starts = []
    original = method.round_generator

    def spy():
        generator = original()
        starts.append(_weights(generator))
        return generator

    method.round_generator = spy
    return starts


def test_fast_meta_updates_shared_generator_and_drops_clone(tiny_store, tmp_path):
    method = _method("fast_meta", tmp_path, tiny_store)
    shared = method.generator
    before = _weights(shared)
    clones = []
    original = method.round_generator

    def spy():
        clone = original()
        clones.append(weakref.ref(clone))
        return clone

    method.round_generator = spy
    method.synthesize()
    gc.collect()

    assert method.generator is shared
    assert not _same(before, _weights(shared))
    assert clones[0]() is None, "the round's clone is still referenced after the round"
    assert sum(isinstance(m, Generator) for m in method.modules()) == 1
    assert not any(isinstance(v, Generator) and v is not shared for v in vars(method).values())


def test_fast_meta_maml_step_is_adam_on_summed_inner_gradients(tiny_store, tmp_path):
    method = _method("fast_meta", tmp_path, tiny_store)
    shared = method.generator
    before = _weights(shared)
    grads: list[dict[str, torch.Tensor]] = []
    original = method.after_backward

    def spy():
        clone = method.round_clone[0]  # the generator the round optimizes
        grads.append({k: p.grad.detach().clone() for k, p in clone.named_parameters()})
        original()

    method.after_backward = spy
    method.synthesize()

    assert len(grads) == method.cfg.g_steps
    # Adam's first step moves every weight by lr against the sign of its gradient (up to eps)
    lr = method.cfg.lr_g * method.cfg.g_steps
    for name, p in shared.named_parameters():
        total = sum(g[name] for g in grads)
        moved = total.abs() > 1e-6
        expected = before[name] - lr * torch.sign(total)
        assert torch.allclose(p.detach()[moved], expected[moved], atol=lr * 1e-2), name


def test_fast_meta_reptile_is_adam_on_the_scaled_weight_difference(tiny_store, tmp_path):
    method = _method("fast_meta", tmp_path, tiny_store, **{"method.meta": "reptile"})
    before = _weights(method.generator)
    ends = []
    original = method.after_round

    def spy(batch):
        ends.append(_weights(method.round_clone[0]))
        original(batch)

    method.after_round = spy
    method.synthesize()

    clone, lr = ends[0], method.cfg.lr_g * method.cfg.g_steps
    assert not _same(before, clone)
    # the meta-gradient is 67 * (shared - clone); Adam's first step moves each weight by lr toward the clone
    for name, p in method.generator.named_parameters():
        diff = before[name] - clone[name]
        moved = diff.abs() * method.cfg.reptile_scale > 1e-6
        expected = before[name] - lr * torch.sign(diff)
        assert torch.allclose(p.detach()[moved], expected[moved], atol=lr * 1e-2), name


def test_fast_meta_rejects_unknown_meta_rule(tiny_store, tmp_path):
    with pytest.raises(DfkdError, match="method.meta"):
        _method("fast_meta", tmp_path, tiny_store, **{"method.meta": "sgd"})


@pytest.mark.parametrize("reset, continues", [(False, True), (True, False)])
def test_fast_generator_continues_across_rounds(tiny_store, tmp_path, reset, continues):
    # the reset=True case shows the check below does detect a re-initialization
    method = _method("fast", tmp_path, tiny_store, **{"method.reset_generator": reset})
    starts = _record_round_starts(method)
    method.synthesize()
    after_first = _weights(method.generator)
    method.synthesize()

    assert not _same(starts[0], after_first)
    assert _same(starts[1], after_first) is continues


@pytest.mark.numeric
@pytest.mark.parametrize("name", NAMES)
def test_longer_round_lowers_synthesis_loss(tiny_store, tmp_path, name):
    method = _method(name, tmp_path, tiny_store, **{"method.g_steps": 30})
    batch = method.synthesize()
    curve = batch.loss_curve
    assert len(curve) == 30
    assert_effect(sum(curve[:3]) / 3, sum(curve[-3:]) / 3, "synthesis loss: first 3 steps over last 3")


def test_bn_statistics_momentum_is_a_moving_average(tiny_store, tmp_path):
    method = _method("fast_meta", tmp_path, tiny_store)
    hooks = method.bn_stats.hooks
    assert all(h.momentum == pytest.approx(0.9) for h in hooks)
    method.synthesize()
    first = [h.ema for h in hooks]
    assert all(e is not None for e in first)
    method.synthesize()
    # the second round blends its batch statistics into the average at rate 0.9
    for h, (mean, var) in zip(hooks, first):
        batch_mean, batch_var = h._last
        assert not torch.equal(batch_mean, mean)
        assert torch.allclose(h.ema[0], 0.9 * mean + 0.1 * batch_mean)
        assert torch.allclose(h.ema[1], 0.9 * var + 0.1 * batch_var)


def test_fast_meta_state_round_trips_through_a_checkpoint(tiny_store, tmp_path):
    method = _method("fast_meta", tmp_path, tiny_store)
    method.synthesize()
    buf = io.BytesIO()
    torch.save(method.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)  # how the runner reads checkpoints

    fresh = tiny_runner("fast_meta", tmp_path / "other", tiny_store).method
    fresh.load_state_dict(state)

    saved, loaded = method.meta_optimizer.state_dict()["state"], fresh.meta_optimizer.state_dict()["state"]
    assert saved and saved.keys() == loaded.keys()
    for i in saved:
        assert torch.equal(saved[i]["exp_avg"], loaded[i]["exp_avg"])
    for h, g in zip(method.bn_stats.hooks, fresh.bn_stats.hooks):
        assert torch.equal(h.ema[0], g.ema[0]) and torch.equal(h.ema[1], g.ema[1])
    assert _same(_weights(method.generator), _weights(fresh.generator))


def test_fast_meta_reset_l0_fires_once_at_its_round(tiny_store, tmp_path):
    # 2 rounds per epoch, 1 warm-up epoch: the reset comes at round 2 + 1 = 3 (1-based), as the authors count
    runner = tiny_runner("fast_meta", tmp_path / "run", tiny_store,
                         {"warmup_epochs": 1, "method.reset_l0": "true", "method.reset_l0_round": 2})
    method = runner.method
    generator = method.generator
    fired = []
    reset = generator.reset_input_layers

    def reset_spy():
        before = (_weights(generator.project), _weights(generator.body[0]))
        reset()
        fired.append((method.rounds_done, before, (_weights(generator.project), _weights(generator.body[0]))))

    generator.reset_input_layers = reset_spy
    assert runner.run()["status"] == "complete"

    assert [rounds for rounds, _, _ in fired] == [3]
    (_, (proj_before, bn_before), (proj_after, bn_after)) = fired[0]
    assert proj_before["bias"].abs().sum() > 0 and proj_after["bias"].abs().sum() == 0
    assert not torch.equal(proj_before["weight"], proj_after["weight"])
    # the first BatchNorm's weight is drawn around 0, not 1: the authors' reset_l0 as written
    assert bn_before["weight"].mean() > 0.5 and bn_after["weight"].abs().mean() < 0.1


def test_plain_fast_has_no_scheduled_reset():
    with pytest.raises(DfkdError, match="reset_l0"):
        resolve_config("fast", "quick", {"method.reset_l0": "true"})


def test_adversarial_term_starts_at_the_warmup_th_round(tiny_store, tmp_path):
    method = _method("fast", tmp_path, tiny_store, warmup_epochs=3, epochs=4)
    adversarial = []
    for _ in range(4):
        batch = method.synthesize()
        adversarial.append("adv" in batch.losses)
    assert adversarial == [False, False, True, True]  # the authors' `self.ep >= warmup`, ep counting rounds


def test_the_shared_generator_keeps_pytorchs_default_initialization(tiny_store, tmp_path):
    fast = _method("fast", tmp_path / "f", tiny_store)
    bn_weights = [m.weight for m in fast.generator.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert all(torch.equal(w, torch.ones_like(w)) for w in bn_weights)  # never DCGAN-initialized
    cmi = _method("cmi", tmp_path / "c", tiny_store, **{"method.g_steps": 1})
    cmi.synthesize()  # CMI re-initializes every round: BN weights drawn from N(1, 0.02)
    assert not any(torch.equal(m.weight, torch.ones_like(m.weight))
                   for m in cmi.generator.modules() if isinstance(m, torch.nn.BatchNorm2d))


@pytest.mark.parametrize("name", NAMES)
def test_tiny_run_with_warmup_completes(tiny_store, tmp_path, name):
    run_dir = tmp_path / "run"
    summary = tiny_runner(name, run_dir, tiny_store, {"warmup_epochs": 1, "epochs": 2}).run()

    assert summary["status"] == "complete"
    for file in ("config.json", "metrics.jsonl", "summary.json", "student.pt", "samples.png"):
        assert (run_dir / file).is_file(), file
    assert json.loads((run_dir / "config.json").read_text())["method_cfg"]["bn_momentum"] == pytest.approx(0.9)
    warm, kd = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert warm["warmup"] is True and warm["kd_steps"] == 0
    assert not any(k.startswith("kd/") for k in warm)
    assert "synth/bn" in warm  # with 2 rounds per epoch the adversarial term is on from round 1 (ep >= 1)
    assert kd["warmup"] is False and kd["kd_steps"] > 0
    assert "kd/kd" in kd and "synth/adv" in kd


@pytest.mark.parametrize("name", NAMES)
def test_presets_resolve(name):
    cfg, method_cfg, _ = resolve_config(name, "paper")
    assert (cfg.epochs, cfg.warmup_epochs, cfg.lr, cfg.synth_batch_size) == (220, 20, 0.2, 256)
    assert (cfg.lr_min, cfg.weight_decay) == (2e-4, 1e-4)  # datafree_kd.py's eta_min and --wd default
    assert getattr(method_cfg, "reset_l0", False) is (name == "fast_meta")
    assert not method_cfg.reset_generator
    for preset in ("quick", "cpu"):
        cfg, method_cfg, _ = resolve_config(name, preset)
        assert 0 < cfg.warmup_epochs < cfg.epochs and method_cfg.g_steps == 5
