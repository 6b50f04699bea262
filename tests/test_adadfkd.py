"""AdaDFKD: the windowed InfoNCE against the negative bank, its easy-to-hard schedule, the adversarial weight's
schedule, the self-paced student loss, and one round on the tiny teacher. The registry-parametrized tests
(test_methods, test_resume, ...) cover what it shares with the other methods."""

from __future__ import annotations

import math
from collections import defaultdict

import pytest
import torch
import torch.nn.functional as F
from helpers import TINY_CLASSES, TINY_SHAPE, assert_effect, tiny_runner

from dfkd_bench.config import resolve_config
from dfkd_bench.errors import DfkdError
from dfkd_bench.losses import kl_divergence
from dfkd_bench.method import LossContext, Outputs
from dfkd_bench.methods.adadfkd import (
    AdaDFKD,
    AdaDFKDLoss,
    NegativeBank,
    adversarial_weight,
    curriculum_lambda,
    hard_factor,
    instance_nce,
    self_paced_weight,
    windowed_nce,
)
from dfkd_bench.registry import LOSSES, SYNTHESIZERS, get_preset
from dfkd_bench.zoo import create_model


def _runner(tmp_path, store, **overrides):
    runner = tiny_runner("adadfkd", tmp_path / "run", store, overrides)
    runner.student.eval().requires_grad_(False)  # as the runner leaves it for synthesis
    return runner


# ---------------------------------------------------------------- registration, defaults, presets

def test_registered_as_an_online_method_with_its_own_loss():
    assert SYNTHESIZERS.get("adadfkd") is AdaDFKD and LOSSES.get("adadfkd") is AdaDFKDLoss
    assert AdaDFKD.batch_source == "fresh" and AdaDFKD.default_loss == "adadfkd" and not AdaDFKD.uses_labels
    cfg = AdaDFKD.Config()
    # scripts/adadfkd/adadfkd_cifar10_resnet34_resnet18.sh and adadfkd.py:83
    assert (cfg.g_steps, cfg.lr_g, cfg.beta1, cfg.beta2, cfg.nz) == (1, 1e-3, 0.9, 0.99, 512)
    assert (cfg.lmda_ent, cfg.oh, cfg.act, cfg.bn, cfg.adv, cfg.adv_type) == (-20.0, 1.0, 0.0, 1.0, 1.0, "kl")
    assert (cfg.hard, cfg.tau, cfg.n_neg, cfg.length, cfg.begin_fraction, cfg.end_fraction) == (
        0.1, 0.07, 4096, 0.9, 0.25, 0.75)
    assert cfg.sample_eval and not cfg.student_bn_train
    loss = AdaDFKDLoss.Config()
    assert (loss.base, loss.s_nce, loss.tau, loss.curr, loss.lambda_0, loss.alpha) == ("kl", 0.1, 0.07, "log", 2.2,
                                                                                       1e-4)


def test_presets_share_the_protocol_budget_and_schedule_over_their_own_epochs():
    for preset in ("quick", "cpu"):
        ours, cmi = get_preset("adadfkd", preset), get_preset("cmi", preset)
        for key in ("epochs", "ep_steps", "batch_size", "lr", "temperature"):
            assert ours[key] == cmi[key], (preset, key)
        assert ours["kd_steps"] == 10 and ours["method.g_steps"] == 1 and ours["kd_augment"] is False
    for preset in ("quick", "cpu", "paper", "paper-wrn", "paper-cifar100"):
        values = get_preset("adadfkd", preset)
        assert "method.schedule_epochs" not in values and "method.T" not in values, preset  # the run's own
        cfg, method_cfg, loss_cfg = resolve_config("adadfkd", preset)
        assert cfg.loss == "adadfkd" and isinstance(loss_cfg, AdaDFKDLoss.Config)


@pytest.mark.parametrize("setting", ["method.length=0", "method.length=1.5", "method.begin_fraction=0.8",
                                     "method.adv_type=mse", "loss.curr=linear"])
def test_bad_settings_are_refused(setting):
    key, value = setting.split("=")
    with pytest.raises(DfkdError, match=key.split(".")[1]):
        resolve_config("adadfkd", "quick", {key: value})


# ---------------------------------------------------------------- the relationship term (R2M)

def test_windowed_nce_keeps_the_window_of_ranked_negatives_and_matches_a_hand_computation():
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    k = F.normalize(torch.tensor([[1.0, 1.0], [0.0, 1.0]]), dim=1)
    angles = torch.tensor([0.3, 2.5, 1.0, 1.9, 0.1, 2.9, 1.4, 0.7, 2.2, 1.6])  # ten unit negatives
    negatives = torch.stack([angles.cos(), angles.sin()])
    tau, length = 0.5, 0.4  # a window of 4 of the 10 negatives

    def by_hand(start: float) -> float:
        total = 0.0
        for i in range(2):
            ranked = sorted(float(q[i] @ negatives[:, j]) for j in range(10))  # easiest (least similar) first
            kept = ranked[int(start * 10):int((start + length) * 10)]
            pos = float(q[i] @ k[i])
            total += -math.log(math.exp(pos / tau) / (math.exp(pos / tau) + sum(math.exp(s / tau) for s in kept)))
        return total / 2

    for start in (0.0, 0.3, 0.6):
        assert math.isclose(windowed_nce(q, k, negatives, start, length, tau).item(), by_hand(start), rel_tol=1e-5)
    # the hardest window (the most similar negatives) is the hardest task
    assert windowed_nce(q, k, negatives, 0.6, length, tau) > windowed_nce(q, k, negatives, 0.0, length, tau)


def test_windowed_nce_trains_the_anchor_only_and_its_steps_lower_it():
    g = torch.Generator().manual_seed(0)
    negatives = F.normalize(torch.randn(8, 32, generator=g), dim=0)
    k = F.normalize(torch.randn(6, 8, generator=g), dim=1).requires_grad_()
    raw = torch.randn(6, 8, generator=g, requires_grad=True)
    loss = windowed_nce(F.normalize(raw, dim=1), k.detach(), negatives, 0.05, 0.9, 0.07)
    loss.backward()
    assert raw.grad.abs().sum() > 0 and k.grad is None
    opt = torch.optim.SGD([raw], lr=0.5)
    first = loss.item()
    for _ in range(20):
        opt.zero_grad()
        windowed_nce(F.normalize(raw, dim=1), k.detach(), negatives, 0.05, 0.9, 0.07).backward()
        opt.step()
    last = windowed_nce(F.normalize(raw, dim=1), k.detach(), negatives, 0.05, 0.9, 0.07).item()
    assert last < 0.5 * first


def test_the_window_slides_from_the_easiest_to_the_hardest_negatives_between_the_fractions():
    # the paper preset: 300 epochs, length 0.9, fractions 0.25 / 0.75 (datafree_kd.py:672)
    starts = [hard_factor(e, 300, 0.9, 0.25, 0.75) for e in range(300)]
    assert starts[:76] == [0.0] * 76
    assert starts[76] == pytest.approx(0.1 / 150) and starts[150] == pytest.approx(0.1 * 75 / 150)
    assert starts[225:] == [pytest.approx(0.1)] * 75
    assert all(a <= b for a, b in zip(starts, starts[1:]))
    # the quick preset's 5 epochs
    assert [hard_factor(e, 5, 0.9, 0.25, 0.75) for e in range(5)] == pytest.approx([0, 0, 0.05, 0.1, 0.1])
    # length 1 keeps every negative: no curriculum
    assert {hard_factor(e, 10, 1.0, 0.2, 0.8) for e in range(10)} == {0.0}


def test_the_adversarial_weight_grows_as_get_alpha_adv_sets_it_after_each_epoch():
    # adadfkd_cifar10_resnet34_wrn40_1.sh: 1000 epochs, adv 0.1, grad_adv 0.01, fractions 0.2 / 0.8
    adv = [adversarial_weight(e, 1000, 0.1, 0.01, 0.2, 0.8) for e in range(1000)]
    assert adv[:202] == [0.1] * 202  # set after epoch e, used in e + 1; strictly after epoch 200
    assert adv[202] == pytest.approx(0.11) and adv[500] == pytest.approx(0.1 + 299 * 0.01)
    assert adv[801:] == [pytest.approx(0.1 + 600 * 0.01)] * 199
    assert {adversarial_weight(e, 300, 1.0, 0.0, 0.25, 0.75) for e in range(300)} == {1.0}  # every other script


def test_the_negative_bank_is_a_ring_of_unit_columns():
    torch.manual_seed(0)
    bank = NegativeBank(dim=3, size=6)
    assert bank.queue.shape == (3, 6) and torch.allclose(bank.queue.norm(dim=0), torch.ones(6))
    keys = torch.arange(12, dtype=torch.float32).view(4, 3)  # key i = (3i, 3i+1, 3i+2)
    bank.enqueue(keys)
    assert torch.equal(bank.queue[:, :4], keys.T) and int(bank.ptr) == 4
    bank.enqueue(keys[:3] + 100)  # wraps: columns 4, 5, then 0
    assert torch.equal(bank.queue[:, 4:], (keys[:2] + 100).T) and torch.equal(bank.queue[:, 0], keys[2] + 100)
    assert int(bank.ptr) == 1
    many = torch.arange(24, dtype=torch.float32).view(8, 3)  # more keys than columns: the newest six stay
    bank.enqueue(many)
    assert sorted(bank.queue[0].tolist()) == [6.0, 9.0, 12.0, 15.0, 18.0, 21.0] and int(bank.ptr) == 3


# ---------------------------------------------------------------- the student's loss

def test_self_paced_weights_and_the_growing_lambda():
    lam = 2.2
    assert self_paced_weight(torch.tensor(lam), lam, "log").item() == pytest.approx((1 + math.exp(-lam)) / 2)
    losses = torch.tensor([0.0, 1.0, 2.0, 4.0, 8.0])
    v = self_paced_weight(losses, lam, "log")
    assert v[0].item() == pytest.approx(1.0) and all(a > b for a, b in zip(v, v[1:]))  # easy batches count most
    assert self_paced_weight(losses, lam, "hard").tolist() == [1.0, 1.0, 1.0, 0.0, 0.0]
    assert self_paced_weight(losses, lam, "soft").tolist() == pytest.approx([1.0, 1 - 1 / lam, 1 - 2 / lam, 0.0, 0.0])
    assert curriculum_lambda(2.2, 1e-4, 400 * 300) == pytest.approx(14.2)  # the paper run's last step


def test_the_student_loss_on_a_hand_made_case():
    c, h, _ = TINY_SHAPE
    torch.manual_seed(0)
    teacher = create_model("wrn16_1", TINY_CLASSES, c, h).eval()
    student = create_model("wrn16_1", TINY_CLASSES, c, h)
    temperature = 4.0
    loss = AdaDFKDLoss(LossContext(teacher, student, TINY_SHAPE, TINY_CLASSES, temperature),
                       AdaDFKDLoss.Config(s_nce=0.5, tau=0.2, lambda_0=1.5, alpha=0.25))
    x = torch.randn(6, *TINY_SHAPE)
    with torch.no_grad():
        t_map = teacher.forward_features(x)
        t = Outputs(t_map, teacher.forward_head(t_map))
        t_feat = teacher.forward_head(t_map, pre_logits=True)
    for step in range(2):
        s_map = student.forward_features(x)
        s = Outputs(s_map, student.forward_head(s_map))
        terms = loss(s, t, None)
        assert set(terms) == {"kd", "nce"} and int(loss.steps) == step + 1
        with torch.no_grad():
            kd = kl_divergence(s.logits, t.logits, temperature).item()
            sim = F.normalize(t_feat, dim=1) @ F.normalize(student.forward_head(s_map, pre_logits=True), dim=1).T
            nce = sum(-torch.log_softmax(sim[i] / 0.2, 0)[i].item() for i in range(6)) / 6
        lam = 1.5 + 0.25 * step  # lambda_0 + alpha x the steps before this one
        v = (1 + math.exp(-lam)) / (1 + math.exp(kd + 0.5 * nce - lam))
        assert terms["kd"].item() == pytest.approx(v * kd, rel=1e-4)
        assert terms["nce"].item() == pytest.approx(v * 0.5 * nce, rel=1e-4)
    # v is a weight, not a path for gradients: the gradient is v times the unweighted loss's
    student.zero_grad()
    sum(loss(s, t, None).values()).backward()
    weighted = [p.grad.clone() for p in student.parameters()]
    student.zero_grad()
    s_map = student.forward_features(x)
    s = Outputs(s_map, student.forward_head(s_map))
    unweighted = kl_divergence(s.logits, t.logits, temperature) + 0.5 * instance_nce(
        t_feat, student.forward_head(s_map, pre_logits=True), 0.2)
    unweighted.backward()
    lam = 1.5 + 0.25 * 2
    v = (1 + math.exp(-lam)) / (1 + math.exp(unweighted.item() - lam))
    for a, p in zip(weighted, student.parameters()):
        assert torch.allclose(a, v * p.grad, atol=1e-6)


def test_the_student_loss_l1_and_l2_bases_and_other_widths():
    c, h, _ = TINY_SHAPE
    teacher = create_model("wrn16_1", TINY_CLASSES, c, h).eval()  # 64 pooled features
    student = create_model("wrn16_2", TINY_CLASSES, c, h)  # 128: a fresh random map to 64, as the authors
    loss = AdaDFKDLoss(LossContext(teacher, student, TINY_SHAPE, TINY_CLASSES, 20.0),
                       AdaDFKDLoss.Config(base="l1", curr="hard", lambda_0=100.0))
    x = torch.randn(5, *TINY_SHAPE)
    with torch.no_grad():
        t_map = teacher.forward_features(x)
        t = Outputs(t_map, teacher.forward_head(t_map))
    s_map = student.forward_features(x)
    s = Outputs(s_map, student.forward_head(s_map))
    terms = loss(s, t, None)
    assert set(terms) == {"l1", "nce"}
    assert terms["l1"].item() == pytest.approx(F.l1_loss(s.logits, t.logits).item())  # hard weight 1 below lambda
    sum(terms.values()).backward()
    assert all(p.grad is not None for p in student.parameters() if p.requires_grad)
    squared = AdaDFKDLoss(LossContext(teacher, student, TINY_SHAPE, TINY_CLASSES, 20.0),
                          AdaDFKDLoss.Config(base="l2", s_nce=0.0, curr="hard", lambda_0=1e6))
    assert set(terms := squared(s, t, None)) == {"l2"}
    assert terms["l2"].item() == pytest.approx(F.mse_loss(s.logits, t.logits).item())


# ---------------------------------------------------------------- the method on the tiny teacher

def test_one_round_computes_the_authors_terms_and_fills_the_bank(tiny_store, tmp_path):
    runner = _runner(tmp_path, tiny_store, **{"method.g_steps": 3, "method.n_neg": 64})
    method = runner.method
    assert method.optimizer.defaults["betas"] == (0.9, 0.99)
    conv = [m.weight for m in method.generator.modules() if isinstance(m, torch.nn.Conv2d)]
    assert all(0.015 < w.std() < 0.025 for w in conv)  # reset_model's N(0, 0.02), not PyTorch's default
    assert method.bank.queue.shape == (64, 64)  # the teacher's pooled width x n_neg
    before = method.bank.queue.clone()
    method.on_epoch_start(1, warmup=False)
    batch = method.synthesize()
    assert set(batch.losses) == {"ent", "adv", "oh", "bn", "cnce", "total"}
    assert batch.losses["ent"] == pytest.approx(-20 * math.log(TINY_CLASSES), rel=0.01)  # T 20: near uniform
    assert len(batch.loss_curve) == 3 and batch.teacher_passes == 8 * 3 and len(batch.images) == 0
    assert int(method.bank.ptr) == 3 * 8  # each generator step enqueues its batch's student keys
    new = method.bank.queue[:, :24]
    assert not torch.equal(new, before[:, :24]) and torch.allclose(new.norm(dim=0), torch.ones(24))
    assert torch.equal(method.bank.queue[:, 24:], before[:, 24:])
    images = method.sample(5).images
    assert not method.generator.training  # the student's batches come from the generator in eval mode
    assert images.shape == (5, *TINY_SHAPE) and 0 <= images.min() and images.max() <= 1


def test_epochs_set_the_window_and_the_adversarial_weight(tiny_store, tmp_path):
    runner = _runner(tmp_path, tiny_store, **{"epochs": 10, "method.grad_adv": 0.5,
                                              "method.begin_fraction": 0.2, "method.end_fraction": 0.8})
    method = runner.method
    seen = []
    for epoch in range(10):
        method.on_epoch_start(epoch, warmup=False)
        seen.append((method.hard_factor, method.adv))
    assert [h for h, _ in seen] == pytest.approx([hard_factor(e, 10, 0.9, 0.2, 0.8) for e in range(10)])
    assert [a for _, a in seen] == pytest.approx([1.0, 1.0, 1.0, 1.0, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0])


def test_a_student_wider_than_the_teacher_and_no_bank(tiny_store, tmp_path):
    runner = _runner(tmp_path, tiny_store, **{"student": "wrn16_2", "method.g_steps": 2})
    assert runner.method.bank.queue.shape[0] == 64  # the teacher's width: student keys are projected to it
    assert math.isfinite(runner.method.synthesize().losses["cnce"])
    plain = _runner(tmp_path / "plain", tiny_store, **{"method.hard": 0.0, "method.adv": 0.0, "method.g_steps": 2})
    assert plain.method.bank is None
    assert set(plain.method.synthesize().losses) == {"ent", "oh", "bn", "total"}


@pytest.mark.numeric
def test_student_steps_lower_the_distillation_term(tiny_store, tmp_path):
    runner = tiny_runner("adadfkd", tmp_path / "run", tiny_store, {"kd_steps": 1, "batch_size": 16,
                                                                     "synth_batch_size": 16})
    terms = defaultdict(list)
    runner._synthesize(terms)
    for _ in range(40):
        runner._distill_step(terms)
    kd = terms["kd/kd"]
    assert int(runner.loss_fn.steps) == 40
    assert_effect(sum(kd[:8]) / 8, 2 * sum(kd[-8:]) / 8, "weighted KD term: first 8 steps over twice the last 8")
