"""CMI: the InfoNCE term, one synthesis round, the memory bank, and end-to-end runs on the tiny teacher."""

from __future__ import annotations

import io
import json
import math

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_effect, tiny_runner

from dfkd_bench.methods.cmi import CMI, MemoryBank, cmi_contrastive_loss
from dfkd_bench.registry import get_preset
from dfkd_bench.rundir import POOL


def _unit(x: torch.Tensor) -> torch.Tensor:
    return F.normalize(x, dim=1)


@pytest.mark.numeric
def test_contrastive_loss_prefers_matched_views():
    g = torch.Generator().manual_seed(0)
    local = _unit(torch.randn(16, 32, generator=g))
    global_ = _unit(local + 0.05 * torch.randn(16, 32, generator=g))
    shuffled = global_[torch.roll(torch.arange(16), 1)]
    assert_effect(cmi_contrastive_loss(local, shuffled, 16, 0.2), cmi_contrastive_loss(local, global_, 16, 0.2),
                  "contrastive loss: shuffled views over matched views")


def test_contrastive_loss_matches_the_authors_definition():
    """Rows 0..4 are the current batch, 5..11 the bank's; each local row must pick its own global row among
    all global rows, and the current and bank means are added."""
    g = torch.Generator().manual_seed(1)
    local, global_ = (_unit(torch.randn(12, 8, generator=g)) for _ in range(2))
    temperature = 0.5
    per_row = []
    for i in range(12):
        scores = [math.exp(float(local[i] @ c) / temperature) for c in global_]
        per_row.append(-math.log(scores[i] / sum(scores)))
    expected = sum(per_row[:5]) / 5 + sum(per_row[5:]) / 7
    assert math.isclose(cmi_contrastive_loss(local, global_, 5, temperature).item(), expected, rel_tol=1e-5)
    # without bank rows it is the plain mean
    assert math.isclose(cmi_contrastive_loss(local[:5], global_[:5], 5, temperature).item(),
                        F.cross_entropy(local[:5] @ global_[:5].T / temperature, torch.arange(5)).item(),
                        rel_tol=1e-6)


def test_contrastive_loss_treats_global_views_as_targets():
    g = torch.Generator().manual_seed(2)
    local = _unit(torch.randn(6, 8, generator=g)).requires_grad_()
    global_ = _unit(torch.randn(6, 8, generator=g)).requires_grad_()
    cmi_contrastive_loss(local, global_, 6, 0.1).backward()
    assert local.grad is not None and local.grad.abs().sum() > 0
    assert global_.grad is None  # detached, as the authors' global_feature.detach()


def test_memory_bank_is_fifo_and_capped():
    bank = MemoryBank(capacity=5, dim=2)
    rows = torch.arange(16, dtype=torch.float32).view(8, 2)  # row i holds (2i, 2i+1)
    bank.add(rows[:3])
    assert len(bank) == 3
    bank.add(rows[3:7])  # 7 rows seen, only the newest 5 are kept
    assert len(bank) == 5
    assert sorted(bank.features[:, 0].tolist()) == [4.0, 6.0, 8.0, 10.0, 12.0]
    bank.add(rows[7:])
    assert sorted(bank.features[:, 0].tolist()) == [6.0, 8.0, 10.0, 12.0, 14.0]
    assert len(bank.sample(3, torch.device("cpu"))) == 3
    assert len(bank.sample(100, torch.device("cpu"))) == 5

    restored = MemoryBank(capacity=5, dim=2)
    restored.load_state_dict(bank.state_dict())
    assert torch.equal(restored.features, bank.features) and restored.next == bank.next


@pytest.mark.numeric
def test_synthesis_round_lowers_the_loss_and_trains_the_head(tiny_store, tmp_path):
    runner = tiny_runner("cmi", tmp_path / "run", tiny_store, {"method.g_steps": 30})
    method = runner.method
    assert isinstance(method, CMI) and method.cfg.reset_generator
    head_before = [p.detach().clone() for p in method.head.parameters()]
    batch = method.synthesize()
    curve = batch.loss_curve
    assert len(curve) == 30 and all(math.isfinite(v) for v in curve)
    assert_effect(sum(curve[:5]) / 5, sum(curve[-5:]) / 5, "synthesis loss: first 5 steps over last 5")
    assert {"bn", "ce", "adv", "cr", "total"} <= set(batch.losses)
    # with an empty bank the contrastive term starts near chance, cr * log(batch), and falls below it
    assert_effect(method.cfg.cr * math.log(8), batch.losses["cr"], "contrastive term: chance over the round's")
    assert batch.images.shape == (8, 3, 16, 16) and 0 <= batch.images.min() and batch.images.max() <= 1
    assert any(not torch.equal(a, b) for a, b in zip(head_before, method.head.parameters()))
    # global and local views: two teacher passes per image and step
    assert batch.teacher_passes == 2 * 8 * 30


def test_head_keeps_one_adam_for_the_run_and_the_bank_keeps_the_best_steps_views(tiny_store, tmp_path):
    runner = tiny_runner("cmi", tmp_path / "run", tiny_store, {"method.g_steps": 6})
    method = runner.method
    optimizer = method.head_optimizer
    assert optimizer.defaults["betas"] == (0.9, 0.999) and optimizer.defaults["lr"] == method.cfg.lr_g
    kept = []
    original = method.on_best_step

    def spy():
        original()
        kept.append(method._step_features.clone())

    method.on_best_step = spy
    method.synthesize()
    assert torch.equal(method.bank.features, kept[-1])  # no extra forward with fresh augmentations
    method.synthesize()
    assert method.head_optimizer is optimizer  # not re-created per round
    steps = {int(state["step"]) for state in optimizer.state.values()}
    assert steps == {12}  # Adam's moments carried across both rounds


def test_bank_grows_by_the_batch_and_is_capped(tiny_store, tmp_path):
    runner = tiny_runner("cmi", tmp_path / "run", tiny_store, {"method.g_steps": 2, "method.bank_size": 12})
    method = runner.method
    assert len(method.bank) == 0
    method.synthesize()
    assert len(method.bank) == 8
    first = method.bank.features.clone()
    method.synthesize()
    assert len(method.bank) == 12
    # the oldest features were replaced; the newest first-round ones survive
    assert torch.equal(method.bank.features[4:8], first[4:8])
    assert not torch.equal(method.bank.features[:4], first[:4])
    # the bank survives a checkpoint as the runner writes and reads it
    buffer = io.BytesIO()
    torch.save(method.state_dict(), buffer)
    buffer.seek(0)
    fresh = tiny_runner("cmi", tmp_path / "fresh", tiny_store, {"method.g_steps": 2, "method.bank_size": 12}).method
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    assert torch.equal(fresh.bank.features, method.bank.features) and fresh.bank.next == method.bank.next


def test_end_to_end_tiny_run(tiny_store, tmp_path):
    run_dir = tmp_path / "run"
    summary = tiny_runner("cmi", run_dir, tiny_store, {"method.g_steps": 2}).run()
    assert summary["status"] == "complete"
    for name in ("config.json", "metrics.jsonl", "summary.json", "student.pt", "samples.png"):
        assert (run_dir / name).is_file(), name
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 2 and "synth/cr" in metrics[-1]
    assert summary["images"] == 2 * 2 * 8  # epochs x rounds x synthesis batch


def test_bank_run_seeds_the_main_run(tiny_store, tmp_path):
    bank_dir = tmp_path / "bank"
    bank_summary = tiny_runner("cmi", bank_dir, tiny_store, {"method.g_steps": 2}, preset="bank").run()
    assert bank_summary["status"] == "complete" and bank_summary["kd_steps"] == 0
    assert (bank_dir / POOL).is_file()
    bank_images = bank_summary["images"]
    assert bank_images == 2 * 2 * 8

    runner = tiny_runner("cmi", tmp_path / "main", tiny_store, {"method.g_steps": 2, "init_bank": str(bank_dir)})
    assert len(runner.pool) == bank_images
    bank_pool = torch.load(bank_dir / POOL, weights_only=True)
    runner.run()
    assert len(runner.pool) == bank_images + 2 * 2 * 8
    assert torch.equal(runner.pool.tensors()[0][:bank_images], bank_pool["images"])


def test_presets_resolve_to_the_published_settings():
    paper = get_preset("cmi", "paper")  # scripts/cmi/scratch_cmi_cifar10_wrn402_wrn161.sh
    assert (paper["synth_batch_size"], paper["batch_size"], paper["method.g_steps"]) == (256, 128, 200)
    assert (paper["ep_steps"], paper["kd_steps"], paper["epochs"]) == (400, 400, 200)
    bank = get_preset("cmi", "bank")
    assert bank["synthesis_only"]
    assert bank["epochs"] * (bank["ep_steps"] // bank["kd_steps"]) == 400
    cfg = CMI.Config()
    assert (cfg.lr_g, cfg.bn, cfg.oh, cfg.adv, cfg.cr, cfg.cr_T) == (1e-3, 1, 1, 0.5, 0.8, 0.1)
    assert (cfg.bank_size, cfg.n_negatives, cfg.head_dim, cfg.local_scale) == (40960, 4096, 256, (0.25, 1.0))
