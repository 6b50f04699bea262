"""CSD: rotation labels, the synthesis objective, the auxiliary head's life cycle, the csd loss,
and end-to-end runs with its own loss, with plain KL, and the label check."""

from __future__ import annotations

import io
import json

import pytest
import torch
import torch.nn.functional as F
from helpers import TINY, TINY_CLASSES, TINY_SHAPE, assert_effect, tiny_runner

from dfkd_bench.config import resolve_config
from dfkd_bench.errors import DfkdError
from dfkd_bench.method import LossContext, Outputs
from dfkd_bench.methods.csd import CSD, CSDLoss, rotate_with_labels
from dfkd_bench.registry import LOSSES, SYNTHESIZERS
from dfkd_bench.rundir import METRICS, read_metrics
from dfkd_bench.zoo import create_model, stage_modules


def _synthesize(runner):
    """One round as the runner does it: the student frozen and in eval mode."""
    runner.student.eval().requires_grad_(False)
    try:
        return runner.method.synthesize()
    finally:
        runner.student.train().requires_grad_(True)


def _head_state(method: CSD) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in method.aux_head.state_dict().items()}


def _fixed_head_ce(method: CSD, images: torch.Tensor, labels: torch.Tensor) -> float:
    x4, y4 = rotate_with_labels(method.ctx.normalizer(images), labels)
    with torch.no_grad():
        return method.aux_cross_entropy(method.student_features(x4), y4).item()


def test_registered_with_labels_and_own_loss():
    assert SYNTHESIZERS.get("csd") is CSD and LOSSES.get("csd") is CSDLoss
    assert CSD.uses_labels and CSD.default_loss == "csd" and CSDLoss.needs_labels
    cfg = CSD.Config()
    assert (cfg.g_steps, cfg.lr_g, cfg.oh, cfg.bn, cfg.csd, cfg.adv) == (200, 1e-3, 1.0, 1.0, 10.0, 0.0)
    assert cfg.reset_generator and CSDLoss.Config().fea == 30.0


def test_rotation_labels_and_images():
    x = torch.rand(3, 2, 5, 5)
    y = torch.tensor([0, 2, 1])
    x4, y4 = rotate_with_labels(x, y)
    assert x4.shape == (12, 2, 5, 5)
    for r in range(4):
        block = slice(3 * r, 3 * r + 3)
        assert torch.equal(y4[block], 4 * y + r)
        assert torch.equal(x4[block], torch.rot90(x, r, dims=(2, 3)))
    # 90 degrees counter-clockwise: the top row becomes the left column, read bottom-up
    assert torch.equal(x4[3, :, :, 0], x[0, :, 0, :].flip(-1))
    assert set(y4.tolist()) == {4 * c + r for c in y.tolist() for r in range(4)}
    with pytest.raises(ValueError):
        rotate_with_labels(torch.rand(1, 1, 4, 6), torch.tensor([0]))


@pytest.mark.numeric
def test_synthesis_raises_the_aux_ce_of_a_fixed_head(tmp_path, tiny_store):
    """Same seed, same student, same head: csd > 0 yields a batch the head finds harder than csd = 0.

    The BN and CE terms are off, so the csd term is all that moves the generator: beside them its pull
    on the unit-norm head is a hundredth of a nat after 40 steps, less than another CPU's rounding moves
    it; alone it is 0.04 nats, 20 times the spread over three kernel paths (benchmarks/effect_margins.py).
    """
    ce = {}
    head = None
    for weight in (10.0, 0.0):
        runner = tiny_runner("csd", tmp_path / f"csd{weight}", tiny_store,
                             {"synth_batch_size": 16, "method.g_steps": 40, "method.csd": weight,
                              "method.bn": 0.0, "method.oh": 0.0})
        # A freshly initialized student maps every image to nearly the same features, so the
        # head's CE hardly depends on the images; the teacher's weights (same arch) do carry signal.
        runner.student.load_state_dict(runner.teacher.state_dict())
        method = runner.method
        if head is None:
            head = _head_state(method)
        method.aux_head.load_state_dict(head)
        torch.manual_seed(1)
        batch = _synthesize(runner)
        method.aux_head.load_state_dict(head)  # the round re-initialized it
        runner.student.eval()
        ce[weight] = _fixed_head_ce(method, batch.images, batch.labels)
    assert_effect(ce[10.0], ce[0.0], "aux CE of a fixed head: csd=10 over csd=0")


@pytest.mark.numeric
def test_one_round_lowers_its_own_loss_and_freezes_student_and_head(tmp_path, tiny_store):
    runner = tiny_runner("csd", tmp_path / "run", tiny_store, {"synth_batch_size": 16, "method.g_steps": 30})
    student_before = {k: v.clone() for k, v in runner.student.state_dict().items()}
    batch = _synthesize(runner)
    curve = batch.loss_curve
    assert len(curve) == 30 and all(map(torch.isfinite, torch.tensor(curve)))
    assert_effect(sum(curve[:5]) / 5, sum(curve[-5:]) / 5, "synthesis loss: first 5 steps over last 5")
    assert "csd" in batch.losses
    assert_effect(0.0, batch.losses["csd"], "csd term (minus the aux CE): zero over the round's")
    assert batch.labels is not None and batch.labels.shape == (16,)
    assert batch.images.shape == (16, *TINY_SHAPE)
    assert all(p.grad is None for p in runner.method.aux_head.parameters())
    assert all(p.grad is None for p in runner.student.parameters())
    for k, v in runner.student.state_dict().items():
        assert torch.equal(v, student_before[k]), k


def test_head_steps_after_student_step_and_resets_after_a_round(tmp_path, tiny_store):
    runner = tiny_runner("csd", tmp_path / "run", tiny_store, {"method.g_steps": 2, "lr": 0.05})
    method = runner.method
    optimizer = method.head_optimizer
    # the authors' head SGD: the run's initial lr, momentum 0.9, weight decay 1e-4
    assert optimizer.defaults["lr"] == 0.05 and optimizer.defaults["momentum"] == 0.9
    assert optimizer.defaults["weight_decay"] == 1e-4
    x = torch.randn(8, *TINY_SHAPE)
    y = torch.randint(TINY_CLASSES, (8,))
    bn_before = {k: v.clone() for k, v in runner.student.state_dict().items() if "running" in k}
    before = _head_state(method)
    terms = method.after_student_step(x, y)
    assert set(terms) == {"aux_ce"} and torch.isfinite(torch.tensor(terms["aux_ce"]))
    trained = _head_state(method)
    assert any(not torch.equal(trained[k], before[k]) for k in before)
    momentum = {i: st["momentum_buffer"].clone() for i, st in optimizer.state_dict()["state"].items()}
    assert momentum
    # the rotated batch must not move the student's BN statistics
    for k, v in bn_before.items():
        assert torch.equal(runner.student.state_dict()[k], v), k
    assert runner.student.training
    _synthesize(runner)
    after = _head_state(method)
    # re-initialized as the authors' reset_model: weights N(0, 0.02), biases zero ...
    for k, v in after.items():
        if k.endswith("bias"):
            assert torch.equal(v, torch.zeros_like(v)), k
        else:
            assert not torch.equal(v, trained[k]) and 0.01 < v.std() < 0.03, k
    # ... while the optimizer and its momentum carry over the whole run
    assert method.head_optimizer is optimizer
    for i, buf in momentum.items():
        assert torch.equal(optimizer.state_dict()["state"][i]["momentum_buffer"], buf)
    # the cross entropy takes the L2-normalized logits as they are: no temperature
    features = torch.randn(4, method.aux_head.net[0].in_features)
    labels = torch.randint(4 * TINY_CLASSES, (4,))
    assert torch.allclose(method.aux_cross_entropy(features, labels),
                          F.cross_entropy(method.aux_head(features), labels))
    with pytest.raises(DfkdError):
        method.after_student_step(x, None)


def test_head_and_its_optimizer_are_checkpointed(tmp_path, tiny_store):
    first = tiny_runner("csd", tmp_path / "a", tiny_store, {"method.g_steps": 2})
    first.method.after_student_step(torch.randn(8, *TINY_SHAPE), torch.randint(TINY_CLASSES, (8,)))
    buf = io.BytesIO()
    torch.save(first.method.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    second = tiny_runner("csd", tmp_path / "b", tiny_store, {"method.g_steps": 2, "seed": 5})
    second.method.load_state_dict(state)
    for k, v in first.method.aux_head.state_dict().items():
        assert torch.equal(second.method.aux_head.state_dict()[k], v)
    saved = first.method.head_optimizer.state_dict()["state"]
    loaded = second.method.head_optimizer.state_dict()["state"]
    assert saved and saved.keys() == loaded.keys()
    for i in saved:
        assert torch.equal(saved[i]["momentum_buffer"], loaded[i]["momentum_buffer"])


def test_runner_pool_keeps_labels(tmp_path, tiny_store):
    runner = tiny_runner("csd", tmp_path / "run", tiny_store, {"method.g_steps": 2})
    runner.run()
    assert runner.pool.has_labels and len(runner.pool) == 2 * 2 * 8


@pytest.mark.parametrize("teacher,student", [("wrn16_2", "wrn16_1"), ("cifar_resnet18", "wrn16_1"),
                                             ("wrn16_1", "cifar_vgg8_bn")])
def test_csd_loss_aligns_the_last_stage_maps(teacher, student):
    c, h, _ = TINY_SHAPE
    t_net = create_model(teacher, TINY_CLASSES, c, h).eval()
    s_net = create_model(student, TINY_CLASSES, c, h)
    loss = CSDLoss(LossContext(t_net, s_net, TINY_SHAPE, TINY_CLASSES, 4.0), CSDLoss.Config())
    maps = {}
    for name, net in (("t", t_net), ("s", s_net)):
        stage_modules(net)[-1].register_forward_hook(lambda _m, _i, out, name=name: maps.__setitem__(name, out))
    x = torch.randn(4, *TINY_SHAPE)
    y = torch.randint(TINY_CLASSES, (4,))
    with torch.no_grad():
        t_feat = t_net.forward_features(x)
        t = Outputs(t_feat, t_net.forward_head(t_feat))
    s_feat = s_net.forward_features(x)
    s = Outputs(s_feat, s_net.forward_head(s_feat))
    terms = loss(s, t, y)
    assert set(terms) == {"kd", "ce", "fea"}
    assert torch.allclose(terms["ce"], F.cross_entropy(s.logits, y))
    aligned = loss.align(maps["s"])
    assert aligned.shape == maps["t"].shape and maps["s"].shape[1:] != maps["t"].shape[1:]
    assert torch.allclose(terms["fea"], 30.0 * F.mse_loss(aligned, maps["t"]))
    if teacher.startswith("wrn"):  # the WRN's block output before its final BN-ReLU, as the authors' fea[-2]
        assert not torch.allclose(maps["t"], t_feat)
    assert all(conv.bias is None for conv in loss.align if isinstance(conv, torch.nn.Conv2d))
    sum(terms.values()).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in loss.align.parameters())
    with pytest.raises(DfkdError):
        loss(s, t, None)


def _metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_end_to_end_with_its_own_loss(tmp_path, tiny_store):
    summary = tiny_runner("csd", tmp_path / "run", tiny_store, {"method.g_steps": 3}).run()
    assert summary["status"] == "complete" and summary["loss"] == "csd" and summary["epochs_done"] == 2
    last = _metrics(tmp_path / "run")[-1]
    for key in ("kd/kd", "kd/ce", "kd/fea", "kd/aux_ce", "synth/csd"):
        assert key in last, key


def test_end_to_end_with_plain_kl(tmp_path, tiny_store):
    summary = tiny_runner("csd", tmp_path / "run", tiny_store, {"method.g_steps": 3, "loss": "kl"}).run()
    assert summary["status"] == "complete" and summary["loss"] == "kl"
    last = _metrics(tmp_path / "run")[-1]
    assert "kd/kd" in last and "kd/fea" not in last and "kd/aux_ce" in last


def test_init_bank_keeps_labels_for_the_main_run(tmp_path, tiny_store):
    bank = tiny_runner("csd", tmp_path / "bank", tiny_store, {"method.g_steps": 2}, preset="bank")
    assert bank.cfg.synthesis_only and bank.method.cfg.csd == 0
    assert bank.run()["status"] == "complete" and (tmp_path / "bank" / "pool.pt").is_file()
    main = tiny_runner("csd", tmp_path / "main", tiny_store, {"method.g_steps": 2, "init_bank": str(tmp_path / "bank")})
    assert len(main.pool) == len(bank.pool) and main.pool.has_labels
    assert main.run()["status"] == "complete"


def test_csd_loss_refused_for_a_method_without_labels(tmp_path, tiny_store):
    with pytest.raises(DfkdError, match="needs labels"):
        tiny_runner("deepinversion", tmp_path / "run", tiny_store, {"method.g_steps": 2, "loss": "csd"})


@pytest.mark.parametrize("preset", ["paper", "quick", "cpu", "bank"])
def test_presets_resolve_with_either_loss(preset):
    for loss in ("csd", "kl"):
        cfg, method_cfg, _ = resolve_config("csd", preset, {"dataset": TINY, "loss": loss})
        assert cfg.loss == loss
    if preset == "bank":
        assert cfg.synthesis_only and method_cfg.csd == 0 and method_cfg.g_steps == 500
        assert cfg.rounds_per_epoch * cfg.epochs == 400 and cfg.synth_batch_size == 200
    if preset == "paper":
        assert (cfg.kd_steps, cfg.ep_steps, cfg.epochs, cfg.batch_size) == (2000, 2000, 100, 128)


def test_cmi_synthesis_with_csd_loss_runs(tmp_path, tiny_store):
    runner = tiny_runner("cmi", tmp_path / "run", tiny_store, {"method.g_steps": 2, "loss": "csd"})
    summary = runner.run()
    assert summary["status"] == "complete" and summary["loss"] == "csd"
    assert runner.pool.has_labels
    terms = read_metrics(tmp_path / "run" / METRICS)[-1]
    assert {"kd/kd", "kd/ce", "kd/fea"} <= set(terms)


def test_the_csd_term_replaces_the_adversarial_term(tmp_path, tiny_store):
    for csd, has_adv in ((10.0, False), (0.0, True)):
        runner = tiny_runner("csd", tmp_path / str(csd), tiny_store,
                             {"method.g_steps": 2, "method.adv": 0.5, "method.csd": csd})
        runner.method.on_epoch_start(0, warmup=False)
        assert ("adv" in _synthesize(runner).losses) is has_adv
