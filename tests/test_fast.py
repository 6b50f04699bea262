"""Fast and Fast-meta: a shared generator that is never reset, the meta-update, BN momentum,
warm-up, the scheduled first-layer reset and checkpointable state, on the tiny fixtures."""

from __future__ import annotations

import gc
import io
import json
import weakref

import pytest
import torch
from conftest import tiny_runner

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

    def spy(generator):
        grads.append({k: p.grad.detach().clone() for k, p in generator.named_parameters()})
        original(generator)

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


@pytest.mark.parametrize("eps", [0.5, 1.0])
def test_fast_meta_reptile_moves_toward_the_clone(tiny_store, tmp_path, eps):
    method = _method("fast_meta", tmp_path, tiny_store, **{"method.meta": "reptile", "method.reptile_eps": eps})
    before = _weights(method.generator)
    ends = []
    original = method.after_round

    def spy(generator, batch):
        ends.append(_weights(generator))
        original(generator, batch)

    method.after_round = spy
    method.synthesize()

    clone = ends[0]
    assert not _same(before, clone)
    for name, p in method.generator.named_parameters():
        assert torch.allclose(p.detach(), before[name] + eps * (clone[name] - before[name]), atol=1e-6), name


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


@pytest.mark.parametrize("name", NAMES)
def test_longer_round_lowers_synthesis_loss(tiny_store, tmp_path, name):
    method = _method(name, tmp_path, tiny_store, **{"method.g_steps": 30})
    batch = method.synthesize()
    curve = batch.loss_curve
    assert len(curve) == 30
    assert sum(curve[-3:]) / 3 < sum(curve[:3]) / 3


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


@pytest.mark.parametrize("name", NAMES)
def test_scheduled_first_layer_reset_fires_once_at_its_epoch(tiny_store, tmp_path, name):
    runner = tiny_runner(name, tmp_path / "run", tiny_store,
                         {"warmup_epochs": 1, "method.reset_first_layer_epoch": 1})
    method = runner.method
    generator = method.generator
    epochs, fired = [], []
    on_epoch_start, reset_first_layer = method.on_epoch_start, generator.reset_first_layer

    def epoch_spy(epoch, warmup):
        epochs.append(epoch)
        on_epoch_start(epoch, warmup)

    def reset_spy():
        before = _weights(generator.project)
        reset_first_layer()
        fired.append((epochs[-1], before, _weights(generator.project)))

    method.on_epoch_start = epoch_spy
    generator.reset_first_layer = reset_spy
    assert runner.run()["status"] == "complete"

    assert [epoch for epoch, _, _ in fired] == [1]
    # epoch 0 trained the layer (its bias left zero); the reset draws new weights and zeroes the bias
    _, before, after = fired[0]
    assert before["bias"].abs().sum() > 0 and after["bias"].abs().sum() == 0
    assert not torch.equal(before["weight"], after["weight"])


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
    assert "synth/adv" not in warm and "synth/bn" in warm
    assert kd["warmup"] is False and kd["kd_steps"] > 0
    assert "kd/kd" in kd and "synth/adv" in kd


@pytest.mark.parametrize("name", NAMES)
def test_presets_resolve(name):
    cfg, method_cfg, _ = resolve_config(name, "paper")
    assert (cfg.epochs, cfg.warmup_epochs, cfg.lr, cfg.synth_batch_size) == (220, 20, 0.2, 256)
    assert method_cfg.reset_first_layer_epoch == cfg.warmup_epochs + 120
    assert not method_cfg.reset_generator
    for preset in ("quick", "cpu"):
        cfg, method_cfg, _ = resolve_config(name, preset)
        assert 0 < cfg.warmup_epochs < cfg.epochs and method_cfg.g_steps == 5
