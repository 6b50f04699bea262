"""CPNet: the generator is the teacher read backwards, its block inputs are pulled towards the teacher's
re-standardized node inputs, the alignment term and the reverse-KL adversarial term behave as the authors'
code defines them, CutMix's labels weigh the cross-entropy, and a teacher outside the three families is refused."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from helpers import TINY_SHAPE, tiny_runner

from dfkd_bench.errors import DfkdError
from dfkd_bench.losses import adversarial_loss, kl_divergence
from dfkd_bench.methods.cpnet import (
    CoupledBody,
    NodeTargets,
    alignment_loss,
    clamped_pinv,
    color_jitter,
    coupled_nodes,
    mixed_cross_entropy,
    node_shapes,
    reverse_adversarial_loss,
)
from dfkd_bench.zoo import create_model


@pytest.mark.parametrize("arch,channels,size,expected", [
    # WRN-16-2 at 28 px: the stem's, group 1's, group 2's and group 3's outputs
    ("wrn16_2", 1, 28, [(16, 28, 28), (32, 28, 28), (64, 14, 14), (128, 7, 7)]),
    # ResNet-34 at 64 px (Tiny-ImageNet): each stage's last bn2
    ("resnet34", 3, 64, [(64, 64, 64), (128, 32, 32), (256, 16, 16), (512, 8, 8)]),
    # VGG-11 at 32 px: the last BN of stages 1, 2, 3 and 5
    ("vgg11", 3, 32, [(64, 32, 32), (128, 16, 16), (256, 8, 8), (512, 2, 2)]),
])
def test_the_generator_is_the_teacher_read_backwards(arch, channels, size, expected):
    teacher = create_model(arch, 10, channels, size).eval()
    nodes = coupled_nodes(teacher)
    shapes = node_shapes(teacher, nodes, (channels, size, size))
    assert shapes == expected
    body = CoupledBody(32, shapes, (channels, size, size))
    image, features = body(torch.randn(4, 32))
    assert image.shape == (4, channels, size, size) and 0 <= image.min() and image.max() <= 1
    # each block's input has the shape of the node it is coupled to, shallow to deep
    assert [tuple(f.shape[1:]) for f in features] == expected


def test_a_teacher_outside_the_three_families_is_refused():
    with pytest.raises(DfkdError, match="WRN, ResNet or VGG"):
        coupled_nodes(nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8)))


def test_node_targets_carry_the_running_statistics():
    teacher = create_model("wrn16_1", 4, *TINY_SHAPE[:2]).eval()
    nodes = coupled_nodes(teacher)
    for m in nodes:  # running statistics far from what a random batch gives
        m.running_mean.uniform_(-2, 2)
        m.running_var.uniform_(0.5, 3)

    class NoAverage:
        ema = None

    targets = NodeTargets(nodes, [NoAverage()] * len(nodes), momentum=0.9)
    targets.active = True
    with torch.no_grad():
        teacher(torch.rand(16, *TINY_SHAPE))
    for m, t in zip(nodes, targets.targets):
        var, mean = torch.var_mean(t, dim=(0, 2, 3), unbiased=True)
        torch.testing.assert_close(mean, m.running_mean, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(var, m.running_var, atol=1e-4, rtol=1e-3)
    # off: a pass outside synthesis computes nothing
    targets.clear()
    targets.active = False
    with torch.no_grad():
        teacher(torch.rand(4, *TINY_SHAPE))
    assert targets.targets == [None] * len(nodes)
    targets.remove()


def test_clamped_pinv_is_the_pseudo_inverse_with_a_floor_on_singular_values():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(32, 10, generator=g)
    torch.testing.assert_close(clamped_pinv(w), torch.linalg.pinv(w), atol=1e-5, rtol=1e-4)
    u, _, vh = torch.linalg.svd(w, full_matrices=False)
    small = u @ torch.diag(torch.linspace(1.0, 1e-3, 10)) @ vh  # singular values down to 1e-3
    s = torch.linalg.svdvals(clamped_pinv(small))
    assert s.max().item() == pytest.approx(1 / 0.1, rel=1e-4)  # 1/s capped at 1/0.1, not 1/1e-3


def test_alignment_is_zero_orthogonal_to_the_logit_shift_and_one_along_it():
    g = torch.Generator().manual_seed(1)
    k, d = 10, 32
    weight, bias = torch.randn(k, d, generator=g), torch.randn(k, generator=g)
    pinv = clamped_pinv(weight.T)
    onehot = F.one_hot(torch.arange(4) % k, k).float()
    delta = torch.log(torch.tensor(0.9 * (k - 1) / 0.1))
    ideal = (onehot * delta - bias) @ pinv  # features whose logits are the smoothed targets' gap
    shift = torch.ones(1, k) @ pinv  # the direction of a constant added to every logit
    # a feature that differs from the ideal only along the shift: |cos| = 1
    assert alignment_loss(ideal + 3.0 * shift, onehot, pinv, bias).item() == pytest.approx(1.0, abs=1e-5)
    # a difference orthogonal to the shift: 0
    r = torch.randn(4, d, generator=g)
    r = r - (r @ shift.T) / (shift @ shift.T) * shift
    assert alignment_loss(ideal + r, onehot, pinv, bias).item() == pytest.approx(0.0, abs=1e-5)


def test_the_adversarial_term_is_the_reverse_kl_on_agreeing_samples():
    g = torch.Generator().manual_seed(2)
    t = torch.randn(6, 5, generator=g)
    s = t + torch.randn(6, 5, generator=g) * 2
    agree = (s.argmax(1) == t.argmax(1)).float()
    assert 0 < agree.sum() < len(agree)  # a mixed case
    log_ps, log_pt = F.log_softmax(s, 1), F.log_softmax(t, 1)
    reverse = (log_ps.exp() * (log_ps - log_pt)).sum(1)  # KL(p_s || p_t) per sample
    expected = -(reverse * agree).mean()
    torch.testing.assert_close(reverse_adversarial_loss(s, t), expected)
    # NAYER's term, KL(p_t || p_s), is another number
    assert not torch.allclose(adversarial_loss(s, t), expected)
    torch.testing.assert_close(-(kl_divergence(s, t, 1.0, reduction="none") * agree).mean(), adversarial_loss(s, t))


def test_cutmix_labels_weigh_the_cross_entropy():
    logits = torch.randn(3, 4)
    a, b = torch.tensor([0, 1, 2]), torch.tensor([3, 3, 0])
    share = torch.tensor([0.0, 1.0, 0.25])
    mix = torch.stack([a.float(), b.float(), share], 1)
    ce_a = F.cross_entropy(logits, a, reduction="none")
    ce_b = F.cross_entropy(logits, b, reduction="none")
    expected = torch.stack([ce_a[0], ce_b[1], 0.75 * ce_a[2] + 0.25 * ce_b[2]]).mean()
    torch.testing.assert_close(mixed_cross_entropy(logits, mix), expected)


def test_colour_jitter_keeps_to_brightness_and_contrast_on_one_channel():
    gray, rgb = color_jitter(1), color_jitter(3)
    assert gray(torch.rand(8, 1, 12, 12)).shape == (8, 1, 12, 12)
    assert rgb(torch.rand(8, 3, 12, 12)).shape == (8, 3, 12, 12)
    with pytest.raises(Exception):  # hue and saturation are undefined without colour (kornia refuses)
        rgb(torch.rand(8, 1, 12, 12))


def _terms(method, warmup: bool) -> dict[str, float]:
    method.on_epoch_start(0, warmup=warmup)
    return method.synthesize().losses


def test_a_round_optimizes_the_coupling_and_after_warm_up_the_adversarial_terms(tiny_store, tmp_path):
    method = tiny_runner("cpnet", tmp_path / "run", tiny_store, {"method.g_steps": 2}).method
    warm = _terms(method, warmup=True)
    assert {"bn", "ce", "couple"} <= set(warm) and not {"adv", "align"} & set(warm)
    assert warm["couple"] > 0
    after = _terms(method, warmup=False)
    assert {"bn", "ce", "couple", "adv", "align"} <= set(after)
    assert after["adv"] <= 0 <= after["align"]


@pytest.mark.numeric
def test_the_coupling_pulls_the_generator_features_towards_the_teacher(tiny_store, tmp_path):
    """More steps on one generator lower the coupling term: the generator's block inputs move towards the
    teacher's re-standardized node inputs."""
    only_coupling = {"method.g_steps": 40, "method.lr_g": 0.02, "method.adv": 0.0, "method.bn": 0.0, "method.oh": 0.0}
    method = tiny_runner("cpnet", tmp_path / "run", tiny_store, only_coupling).method
    method.on_epoch_start(0, warmup=False)
    couples = []
    original = method._forward

    def record(targets, adversarial):
        x, terms = original(targets, adversarial)
        couples.append(terms["couple"].item())
        return x, terms

    method._forward = record
    method.synthesize()
    # 0.61 here (either kernel path); a generator the term did not reach would stay near 1
    assert sum(couples[-5:]) < 0.8 * sum(couples[:5])
