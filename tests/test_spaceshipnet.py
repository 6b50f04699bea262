"""SpaceshipNet: channel-wise feature exchange, decoding pooled generator features, the feature pools and their
passes, the mSARC loss (CAMs and multi-scale Grad-CAMs) against the authors' arithmetic, and a short run."""

from __future__ import annotations

import copy
from collections import defaultdict

import pytest
import torch
import torch.nn.functional as F
from helpers import TINY_CLASSES, TINY_SHAPE, tiny_runner

from dfkd_bench.build import StudentLoss
from dfkd_bench.errors import DfkdError
from dfkd_bench.generator import Generator
from dfkd_bench.method import LossContext, Outputs
from dfkd_bench.methods.spaceshipnet import (
    LEVEL_ENDS,
    SpaceshipNet,
    SpaceshipNetLoss,
    balanced_labels,
    channel_exchange,
    decode,
    grad_cams,
    map_mse,
)
from dfkd_bench.registry import LOSSES, SYNTHESIZERS, get_preset
from dfkd_bench.rundir import METRICS, read_metrics
from dfkd_bench.zoo import create_model, stage_modules


def _round(runner):
    """One synthesis round as the runner runs it."""
    runner._synthesize(defaultdict(list))


def _loss(teacher, student, **cfg) -> SpaceshipNetLoss:
    teacher.eval().requires_grad_(False)
    return SpaceshipNetLoss(LossContext(teacher, student, TINY_SHAPE, TINY_CLASSES, 30.0),
                            SpaceshipNetLoss.Config(**cfg))


def _terms(loss: SpaceshipNetLoss, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """A student step's loss as the runner computes it: the teacher without gradients, then StudentLoss."""
    teacher = loss.ctx.teacher
    with torch.no_grad():
        f = teacher.forward_features(x)
        t = Outputs(f, teacher.forward_head(f))
    return StudentLoss(loss.ctx.student, loss)(x, t, None)


def test_registered_with_its_own_loss_and_the_authors_defaults():
    assert SYNTHESIZERS.get("spaceshipnet") is SpaceshipNet and LOSSES.get("spaceshipnet") is SpaceshipNetLoss
    assert SpaceshipNet.default_loss == "spaceshipnet" and SpaceshipNet.batch_source == "fresh"
    assert SpaceshipNet.side_information(SpaceshipNet.Config()) == "none"
    cfg = SpaceshipNet.Config()
    assert (cfg.g_steps, cfg.lr_g, cfg.lr_z, cfg.beta1, cfg.nz, cfg.ngf) == (200, 1e-3, 0.0, 0.5, 256, 64)
    assert (cfg.oh, cfg.bn, cfg.adv, cfg.bn_momentum, cfg.reset_generator) == (0.5, 1.0, 0.0, 0.0, False)
    assert cfg.cfe_p == 0.7 and tuple(cfg.levels) == (0, 1, 2)
    loss = SpaceshipNetLoss.Config()
    assert (loss.kd, loss.cam, loss.gradcam) == (1.0, 1.0, 1.0)
    paper = get_preset("spaceshipnet", "paper")
    assert (paper["epochs"], paper["ep_steps"], paper["kd_steps"], paper["batch_size"], paper["synth_batch_size"],
            paper["temperature"], paper["method.g_steps"]) == (200, 2000, 2000, 256, 256, 30.0, 200)
    for name, bad in (("cfe_p", 1.5), ("levels", (0, 3)), ("levels", ())):
        with pytest.raises(DfkdError, match=f"method.{name}"):
            SpaceshipNet.Config(**{name: bad})


def test_balanced_targets_cycle_through_the_classes():
    assert balanced_labels(10, 4).tolist() == [0, 1, 2, 3, 0, 1, 2, 3, 0, 1]


@pytest.mark.parametrize("channels", (6, 7))
def test_channel_exchange_gives_each_sample_half_its_channels_and_the_rest_from_its_mirror(channels):
    n, h = 5, 3
    # value = 100 * sample + channel: every entry names where it came from
    f = (100 * torch.arange(n)[:, None] + torch.arange(channels)[None, :]).float()[:, :, None, None].expand(n, -1, h, h)
    out = channel_exchange(f.clone(), torch.Generator().manual_seed(0))
    assert out.shape == f.shape
    source, channel = out[:, :, 0, 0].long() // 100, out[:, :, 0, 0].long() % 100
    assert torch.equal(channel, torch.arange(channels).expand(n, -1))  # channels keep their places
    assert (out == out[:, :, :1, :1]).all()  # whole channels are exchanged, not pixels
    for i in range(n):
        mirror = n - 1 - i
        assert set(source[i].tolist()) <= {i, mirror}
        if i != mirror:
            assert (source[i] == i).sum() == channels // 2  # the authors' nc // 2 picks from a
    assert torch.equal(out[n // 2], f[n // 2])  # the middle sample of an odd batch is its own mirror
    # each sample draws its own channels
    kept = [frozenset((source[i] == i).nonzero().flatten().tolist()) for i in range(n) if i != n - 1 - i]
    assert len(set(kept)) > 1


def test_decoding_a_level_runs_the_rest_of_the_generator():
    torch.manual_seed(0)
    generator = Generator(32, 8, 16, 3).train()
    features = {}
    for level, index in enumerate(LEVEL_ENDS):
        generator.body[index].register_forward_hook(lambda m, i, o, level=level: features.__setitem__(level, o.clone()))
    z = torch.randn(6, 32)
    images = generator(z)
    assert [tuple(features[k].shape[1:]) for k in range(3)] == [(16, 4, 4), (16, 8, 8), (8, 16, 16)]
    with torch.no_grad():  # train-mode BN on the same batch: the same statistics, the same images
        for level in range(3):
            assert torch.allclose(decode(generator, features[level], level), images, atol=1e-6), level


def test_a_round_pools_its_best_steps_features_not_its_images(tiny_store, tmp_path):
    runner = tiny_runner("spaceshipnet", tmp_path / "run", tiny_store, {"method.g_steps": 3, "synth_batch_size": 6})
    method = runner.method
    before = {k: v.clone() for k, v in method.generator.state_dict().items()}
    _round(runner)
    _round(runner)
    assert len(runner.pool) == 0 and runner.counters.images == 0  # nothing handed to the runner's pool
    c, h, _ = TINY_SHAPE
    shapes = [tuple(pool.chunks[0].shape) for pool in method.pools]
    assert shapes == [(6, 128, h // 4, h // 4), (6, 128, h // 2, h // 2), (6, 64, h, h)]
    assert [len(pool) for pool in method.pools] == [12, 12, 12] and all(len(p.chunks) == 2 for p in method.pools)
    # one generator for the run, trained on (the authors never reset it)
    after = method.generator.state_dict()
    assert any(not torch.equal(after[k], before[k]) for k in before if "weight" in k)
    assert runner.counters.teacher_passes == 2 * 6 * 3


def test_student_batches_are_pooled_features_decoded_by_the_current_generator(tiny_store, tmp_path):
    runner = tiny_runner("spaceshipnet", tmp_path / "run", tiny_store,
                         {"method.g_steps": 2, "synth_batch_size": 8, "method.cfe_p": 0.0, "method.levels": "1"})
    method = runner.method
    with pytest.raises(DfkdError, match="no synthesis round"):
        method.sample(4)
    _round(runner)
    method.generator.eval()
    with torch.no_grad():
        every = decode(method.generator, method.pools[1].chunks[0], 1)
    batches = [method.sample(5).images for _ in range(3)]
    assert [len(b) for b in batches] == [5, 3, 5]  # a pass over the 8 pooled samples, short at its end
    first_pass = torch.cat(batches[:2])
    # each pooled sample once per pass, decoded by the generator as it is now (eval mode)
    match = torch.cdist(first_pass.flatten(1), every.flatten(1)).argmin(1)
    assert sorted(match.tolist()) == list(range(8))
    assert torch.allclose(first_pass, every[match], atol=1e-5)
    assert not method.generator.training
    # with CFE on every batch, the images are no longer the pooled samples'
    method.cfg.cfe_p = 1.0
    method.passes[1].restart()  # a whole pass in one batch: no sample is its own mirror
    mixed = method.sample(8).images
    assert torch.cdist(mixed.flatten(1), every.flatten(1)).min(1).values.max() > 1e-3


def test_the_pools_and_the_batch_randomness_survive_a_checkpoint(tiny_store, tmp_path):
    overrides = {"method.g_steps": 2, "synth_batch_size": 6}
    a = tiny_runner("spaceshipnet", tmp_path / "a", tiny_store, overrides)
    _round(a)
    _round(a)
    state = copy.deepcopy(a.method.state_dict())
    b = tiny_runner("spaceshipnet", tmp_path / "b", tiny_store, overrides)
    b.method.load_state_dict(state)
    assert all(torch.equal(x, y) for p, q in zip(a.method.pools, b.method.pools) for x, y in zip(p.chunks, q.chunks))
    for p in a.method.passes + b.method.passes:  # as after the next round
        p.restart()
    for _ in range(3):
        assert torch.equal(a.method.sample(4).images, b.method.sample(4).images)


def test_msarc_vanishes_for_a_student_equal_to_the_teacher_and_grows_otherwise():
    torch.manual_seed(0)
    teacher = create_model("wrn16_1", TINY_CLASSES, 3, 16)
    with torch.no_grad():  # a teacher that is not at its initialization (zero-mean features, zero fc bias)
        for p in teacher.parameters():
            p.add_(0.1 * torch.randn_like(p))
    x = torch.randn(8, *TINY_SHAPE)
    student = copy.deepcopy(teacher).train().requires_grad_(True)
    student.eval()  # the teacher's BN statistics too: the same function
    same = _terms(_loss(teacher, student), x)
    assert set(same) == {"kd", "cam", "gradcam"}
    assert same["cam"].item() == 0 and same["gradcam"].item() == 0, same  # the same maps, bit for bit
    assert abs(same["kd"].item()) < 1e-4, same  # log_softmax against softmax's log: rounding, times T^2
    other = create_model("wrn16_1", TINY_CLASSES, 3, 16).train()
    terms = _terms(_loss(teacher, other), x)
    assert all(v.item() > 0 for v in terms.values()), terms


@pytest.mark.filterwarnings("ignore:reduction. 'mean'")  # the authors' reduction, on purpose
def test_the_terms_follow_the_authors_arithmetic():
    """KL: PyTorch's default KLDivLoss (mean over batch and classes) * alpha * T^2; CAM: the classifier as a 1x1
    conv, no gradient to it; Grad-CAM: the teacher's class, gradients taken through hooks on the stage outputs."""
    torch.manual_seed(1)
    teacher = create_model("wrn16_2", TINY_CLASSES, 3, 16).eval()
    student = create_model("wrn16_1", TINY_CLASSES, 3, 16).train()
    x = torch.randn(6, *TINY_SHAPE)

    def reference(net):
        maps, grads = [], []

        def keep(module, inputs, output):
            maps.append(output)
            output.register_hook(grads.append)

        handles = [m.register_forward_hook(keep) for m in stage_modules(net)]
        f = net.forward_features(x)
        out = net.forward_head(f)
        for handle in handles:
            handle.remove()
        return f, out, maps, grads

    tf, t_out, t_maps, t_grads = reference(teacher)
    sf, s_out, s_maps, s_grads = reference(student)
    one_hot = F.one_hot(t_out.argmax(1), TINY_CLASSES).float()
    for net, out in ((teacher, t_out), (student, s_out)):  # as gradcam_cope: to the parameters, hooks collect
        torch.autograd.grad(out, list(net.parameters()), grad_outputs=one_hot, retain_graph=True)

    def cams(grads, maps):
        return [(g.mean((2, 3))[:, :, None, None] * m).sum(1) for g, m in zip(grads[::-1], maps)]

    def fc_like_conv(net, features):
        return F.conv2d(features, net.fc.weight[:, :, None, None])

    want = {
        "kd": torch.nn.KLDivLoss(reduction="mean")(F.log_softmax(s_out / 30, 1), F.softmax(t_out / 30, 1)) * 900,
        "cam": F.mse_loss(fc_like_conv(student, sf), fc_like_conv(teacher, tf)),
        "gradcam": sum(F.mse_loss(s, t) for s, t in zip(cams(s_grads, s_maps), cams(t_grads, t_maps))),
    }
    got = _terms(_loss(teacher, student), x)
    for k in want:
        assert torch.allclose(got[k], want[k], rtol=1e-4, atol=1e-9), (k, got[k], want[k])
    # the CAM term alone sends no gradient to the student's classifier (the authors' copied fc weight)
    student.zero_grad()
    _terms(_loss(teacher, student, kd=0.0, gradcam=0.0), x)["cam"].backward()
    assert student.fc.weight.grad is None and student.block1[0].conv1.weight.grad.abs().sum() > 0


def test_grad_cam_weights_are_constants_and_maps_of_other_sizes_are_pooled():
    maps = [torch.randn(3, 4, 5, 5, requires_grad=True)]
    logits = (maps[0] ** 2).mean((2, 3)).sum(1, keepdim=True).expand(3, 2)
    cam = grad_cams(logits, maps, torch.zeros(3, dtype=torch.long), retain_graph=True)[0]
    (grad,) = torch.autograd.grad(cam.sum(), maps)
    # d cam / d map = the (constant) weight of each channel, the gradient's spatial mean: 2 * mean(map) / 25
    weights = 2 * maps[0].detach().mean((2, 3), keepdim=True) / 25
    assert torch.allclose(grad, weights.expand_as(grad))
    a, b = torch.randn(2, 8, 8), torch.randn(2, 4, 4)
    assert torch.allclose(map_mse(a, b), F.mse_loss(F.avg_pool2d(a[:, None], 2)[:, 0], b))
    assert torch.allclose(map_mse(b, a), map_mse(a, b))


def test_stages_of_different_networks_pair_from_the_deepest():
    """ResNet-18 (four stages, 16..2 pixels) teaching WRN-16-1 (three, 16..4): the loss still applies."""
    torch.manual_seed(0)
    teacher = create_model("cifar_resnet18", TINY_CLASSES, 3, 16)
    student = create_model("wrn16_1", TINY_CLASSES, 3, 16).train()
    terms = _terms(_loss(teacher, student), torch.randn(4, *TINY_SHAPE))
    assert all(torch.isfinite(v) and v > 0 for v in terms.values()), terms
    sum(terms.values()).backward()
    assert all(p.grad is not None for p in student.parameters() if p.requires_grad)


def test_a_short_run_trains_on_decoded_batches_and_logs_every_term(tiny_store, tmp_path):
    run_dir = tmp_path / "run"
    summary = tiny_runner("spaceshipnet", run_dir, tiny_store,
                          {"method.g_steps": 3, "epochs": 2, "ep_steps": 4, "kd_steps": 2}).run()
    assert summary["status"] == "complete"
    assert summary["images"] == 2 * 4 * 8  # fresh: every student batch is a new decoding
    last = read_metrics(run_dir / METRICS)[-1]
    for key in ("synth/bn", "synth/ce", "kd/kd", "kd/cam", "kd/gradcam"):
        assert key in last, key
    assert "synth/adv" not in last


def test_gradcam_loss_refuses_compiled_backbones_in_one_line(tiny_store, tmp_path):
    with pytest.raises(DfkdError, match="without --set compile=true"):
        tiny_runner("spaceshipnet", tmp_path / "run", tiny_store, {"compile": True})
    # without the Grad-CAM term nothing differentiates stage maps, and compiling is allowed (checked without
    # compiling: building the loss already runs the backbone, which would compile it)
    runner = tiny_runner("spaceshipnet", tmp_path / "run2", tiny_store, {"loss.gradcam": 0})
    assert runner.loss_fn.compilable(runner.loss_fn.cfg)
