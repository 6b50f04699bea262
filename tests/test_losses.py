"""Golden-value tests of the shared loss terms."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from dfkd_bench.losses import (
    BNStatistics,
    adversarial_loss,
    bn_statistics_loss,
    clamped_js_divergence,
    kl_divergence,
    total_variation,
)


def _batch_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and biased variance over (N, H, W), per channel."""
    return x.mean(dim=(0, 2, 3)), x.var(dim=(0, 2, 3), unbiased=False)


def _two_bn_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Conv2d(4, 5, 3, padding=1), nn.BatchNorm2d(5), nn.ReLU(),
    ).eval()


def _bn_inputs(model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """The input of every BatchNorm2d layer on ``x``, captured independently of the code under test."""
    captured: list[torch.Tensor] = []
    handles = [m.register_forward_pre_hook(lambda _m, args: captured.append(args[0].detach().clone()))
               for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    return captured


def _match_running_stats(model: nn.Module, x: torch.Tensor) -> None:
    """Set each BN layer's running stats to its input's batch stats (in order: earlier layers shape later inputs)."""
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    for i, bn in enumerate(bns):
        mean, var = _batch_stats(_bn_inputs(model, x)[i])
        bn.running_mean.copy_(mean)
        bn.running_var.copy_(var)


# ---------------------------------------------------------------- BN statistics

def test_bn_loss_is_zero_when_batch_stats_equal_running_stats():
    model = _two_bn_net()
    x = torch.randn(8, 3, 6, 6) * 2 + 0.5
    _match_running_stats(model, x)
    assert bn_statistics_loss(model, x).item() < 1e-3
    # another batch has other statistics
    assert bn_statistics_loss(model, torch.randn(8, 3, 6, 6) * 3 - 1).item() > 0.1


def test_bn_loss_hand_computed_value():
    bn = nn.BatchNorm2d(3).eval()  # running mean 0, running var 1
    x = torch.arange(3.0).view(1, 3, 1, 1).expand(4, 3, 5, 5).contiguous()  # channel c is constant c
    # mean (0, 1, 2), variance (0, 0, 0): ||(0,1,2)|| + ||(-1,-1,-1)||
    expected = math.sqrt(5) + math.sqrt(3)
    assert bn_statistics_loss(bn, x).item() == pytest.approx(expected, rel=1e-6)


def test_bn_loss_is_summed_over_every_bn_layer():
    model = _two_bn_net()
    x = torch.randn(6, 3, 5, 5)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
    expected = 0.0
    per_layer = []
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    for bn, inp in zip(bns, _bn_inputs(model, x)):
        mean, var = _batch_stats(inp)
        term = (mean - bn.running_mean).norm() + (var - bn.running_var).norm()
        per_layer.append(term.item())
        expected += term.item()
    assert len(per_layer) == 2 and min(per_layer) > 0
    stats = BNStatistics(model)
    try:
        model(x)
        assert len(stats.hooks) == 2
        assert stats.loss().item() == pytest.approx(expected, rel=1e-5)
        assert [h.loss.item() for h in stats.hooks] == pytest.approx(per_layer, rel=1e-5)
        # per-sample channel means of every BN input, concatenated (CMI's features)
        assert stats.features().shape == (6, 4 + 5)
    finally:
        stats.remove()


def test_bn_loss_only_depends_on_the_last_layer_when_earlier_layers_match():
    model = _two_bn_net()
    x = torch.randn(8, 3, 6, 6)
    _match_running_stats(model, x)
    last = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)][-1]
    shift = torch.tensor([0.3, 0.0, -0.4, 0.0, 0.0])
    last.running_mean.add_(shift)  # the last layer's shift does not change any BN input
    assert bn_statistics_loss(model, x).item() == pytest.approx(0.5, abs=1e-4)


def test_bn_loss_gradient_reaches_the_input_not_the_teacher():
    model = _two_bn_net().requires_grad_(False)
    x = torch.randn(4, 3, 5, 5, requires_grad=True)
    bn_statistics_loss(model, x).backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.parameters())


def test_bn_hooks_are_removed_after_the_one_shot_loss():
    model = _two_bn_net()
    bn_statistics_loss(model, torch.randn(2, 3, 4, 4))
    assert all(not m._forward_hooks for m in model.modules())


def test_bn_statistics_momentum_blends_with_earlier_batches():
    bn = nn.BatchNorm2d(2).eval()
    a = torch.randn(8, 2, 4, 4)
    b = torch.randn(8, 2, 4, 4) * 2 + 1
    mean_a, var_a = _batch_stats(a)
    mean_b, var_b = _batch_stats(b)
    bn.running_mean.copy_(mean_a)
    bn.running_var.copy_(var_a)
    stats = BNStatistics(bn, momentum=0.9)
    try:
        bn(a)
        assert stats.loss().item() < 1e-4  # no history yet: the raw batch statistics
        stats.update_ema()
        bn(b)
        expected = (0.1 * (mean_b - mean_a)).norm() + (0.1 * (var_b - var_a)).norm()
        assert stats.loss().item() == pytest.approx(expected.item(), rel=1e-4)
    finally:
        stats.remove()


def test_bn_statistics_needs_a_bn_layer():
    with pytest.raises(ValueError, match="no BatchNorm2d"):
        BNStatistics(nn.Sequential(nn.Conv2d(1, 1, 1)))


# ---------------------------------------------------------------- KL

def test_kl_is_zero_for_equal_logits_and_positive_otherwise():
    torch.manual_seed(0)
    logits = torch.randn(5, 10)
    assert kl_divergence(logits, logits.clone(), 4.0).item() == pytest.approx(0.0, abs=1e-6)
    assert kl_divergence(logits + 3.0, logits, 4.0).item() == pytest.approx(0.0, abs=1e-5)  # shift-invariant
    assert kl_divergence(torch.randn(5, 10), logits, 4.0).item() > 0


def test_kl_hand_computed_value_and_direction():
    student = torch.tensor([[0.0, 0.0]])  # p_s = (1/2, 1/2)
    teacher = torch.tensor([[math.log(3.0), 0.0]])  # p_t = (3/4, 1/4)
    expected = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)  # KL(p_t || p_s)
    assert kl_divergence(student, teacher, 1.0).item() == pytest.approx(expected, rel=1e-6)
    reverse = 0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25)  # KL(p_s || p_t): the other direction
    assert kl_divergence(teacher, student, 1.0).item() == pytest.approx(reverse, rel=1e-6)


def test_kl_scales_with_temperature_squared():
    torch.manual_seed(1)
    s, t = torch.randn(4, 6), torch.randn(4, 6)
    for temperature in (2.0, 20.0):
        # softmax((T * s) / T) == softmax(s), so only the T^2 factor differs
        scaled = kl_divergence(s * temperature, t * temperature, temperature)
        assert scaled.item() == pytest.approx(kl_divergence(s, t, 1.0).item() * temperature**2, rel=1e-5)


def test_kl_batchmean_is_the_mean_of_the_per_sample_values():
    torch.manual_seed(2)
    s, t = torch.randn(7, 5), torch.randn(7, 5)
    per_sample = kl_divergence(s, t, 3.0, reduction="none")
    assert per_sample.shape == (7,)
    assert (per_sample >= 0).all()
    p_t = torch.softmax(t / 3.0, 1)
    manual = (p_t * (p_t.log() - torch.log_softmax(s / 3.0, 1))).sum(1) * 9.0
    torch.testing.assert_close(per_sample, manual, rtol=1e-5, atol=1e-6)
    assert kl_divergence(s, t, 3.0).item() == pytest.approx(per_sample.mean().item(), rel=1e-6)


# ---------------------------------------------------------------- adversarial

def test_adversarial_loss_masks_samples_where_student_and_teacher_disagree():
    student = torch.tensor([[2.0, 0.0], [0.0, 2.0]])
    teacher = torch.tensor([[3.0, 0.0], [3.0, 0.0]])  # sample 0 agrees (class 0), sample 1 does not
    kl = kl_divergence(student, teacher, 1.0, reduction="none")
    assert kl[0] > 0 and kl[1] > 0
    assert adversarial_loss(student, teacher).item() == pytest.approx(-kl[0].item() / 2, rel=1e-6)


def test_adversarial_loss_is_zero_when_everything_disagrees_and_negative_when_agreeing():
    student = torch.tensor([[0.0, 1.0], [0.0, 5.0]])
    teacher = torch.tensor([[4.0, 0.0], [1.0, 0.0]])
    assert adversarial_loss(student, teacher).item() == 0.0
    agreeing = torch.tensor([[1.0, 0.0], [5.0, 0.0]])
    assert adversarial_loss(agreeing, teacher).item() < 0


# ---------------------------------------------------------------- total variation

def test_total_variation_is_zero_for_a_constant_image():
    assert total_variation(torch.full((2, 3, 8, 8), 0.7)).item() == 0.0


def test_total_variation_hand_computed_value():
    x = torch.tensor([[0.0, 1.0], [0.0, 1.0]]).view(1, 1, 2, 2)
    # horizontal 1, vertical 0, diagonal |x11 - x00| = 1, anti-diagonal |x10 - x01| = 1
    assert total_variation(x).item() == pytest.approx(3.0)
    # a mean, so repeating the image along the batch does not change it
    assert total_variation(x.repeat(4, 3, 1, 1)).item() == pytest.approx(3.0)
    assert total_variation(torch.rand(2, 1, 8, 8)).item() > 0


def test_clamped_js_divergence_matches_the_package_definition():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(5, 4, generator=g) * 4, torch.randn(5, 4, generator=g) * 4
    p, q = F.softmax(s / 3, 1), F.softmax(t / 3, 1)
    m = (0.5 * (p + q)).clamp(0.01, 0.99)
    p, q = p.clamp(0.01, 0.99), q.clamp(0.01, 0.99)
    kl_m_p = (m * (m.log() - p.log())).sum(1).mean()  # KL(M || P): M is the target, as in their F.kl_div call
    kl_m_q = (m * (m.log() - q.log())).sum(1).mean()
    assert torch.allclose(clamped_js_divergence(s, t, 3.0), 0.5 * kl_m_p + 0.5 * kl_m_q)
    assert clamped_js_divergence(t, t, 3.0).abs() < 1e-6
    assert clamped_js_divergence(s, t, 3.0) > 0


def test_bn_hooks_compute_nothing_while_paused():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).eval()
    stats = BNStatistics(model)
    stats.set_active(False)
    model(torch.randn(2, 3, 6, 6))
    assert all(h.loss is None for h in stats.hooks)  # a paused hook leaves nothing behind
    with stats.recording():
        model(torch.randn(2, 3, 6, 6))
    assert stats.loss() > 0 and not stats.hooks[0].active
    stats.remove()
