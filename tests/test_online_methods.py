"""The online methods (DAFL, ZSKT, DFAD, DFQ): what makes each of them itself, on the tiny fixtures.
The registry-parametrized tests (test_methods, test_resume, ...) cover what they share with the others."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from helpers import TINY_CLI, assert_effect, assert_user_error, tiny_runner

from dfkd_bench.cli import cli
from dfkd_bench.config import resolve_config
from dfkd_bench.errors import DfkdError
from dfkd_bench.losses import bn_statistics_loss, mean_prediction_neg_entropy
from dfkd_bench.method import Outputs
from dfkd_bench.methods.zskt import attention_transfer

ONLINE = ("dafl", "zskt", "dfad", "dfq")


def _runner(method, tmp_path, store, preset="quick", **overrides):
    runner = tiny_runner(method, tmp_path / "run", store, overrides, preset)
    runner.student.eval().requires_grad_(False)  # as the runner leaves it for synthesis
    return runner


@torch.no_grad()
def _teacher_and_student(runner, z):
    method = runner.method
    method.generator.train()
    x = method.network_input(method.generator(z))
    return runner.teacher(x), runner.student(x)


def _entropy_of_mean_prediction(logits):
    return -mean_prediction_neg_entropy(logits).item()


# ---------------------------------------------------------------- shared: images and schedule

@pytest.mark.parametrize("method", ("dafl", "zskt", "dfad"))
def test_a_normalized_space_generator_hands_over_its_exact_pre_image(method, tiny_store, tmp_path):
    """The authors feed their generator's output to the networks as it is: after the runner's
    normalization the student must see that same tensor."""
    runner = _runner(method, tmp_path, tiny_store)
    gen = runner.method.generator
    assert gen.normalized_output
    torch.manual_seed(3)
    images = runner.method.draw(16)
    torch.manual_seed(3)
    with torch.no_grad():
        out = gen(torch.randn(16, runner.method.cfg.nz))
    assert torch.allclose(runner.normalizer(images), out, atol=1e-5)
    assert images.min() < 0 or images.max() > 1  # unclipped: the authors' generators are unbounded


@pytest.mark.parametrize("method", ("dafl", "zskt", "dfad"))
def test_the_package_preset_uses_the_packages_sigmoid_generator(method, tiny_store, tmp_path):
    runner = _runner(method, tmp_path, tiny_store, preset="package", **{"method.g_steps": 1})
    assert isinstance(runner.method.generator.head, torch.nn.Sigmoid)
    assert runner.cfg.loss == ("l1" if method == "dfad" else "kl")
    runner.method.synthesize()
    images = runner.method.sample(8).images
    assert images.shape == (8, 3, 16, 16) and 0 <= images.min() and images.max() <= 1


def test_the_generators_lr_follows_the_students_schedule_only_where_the_authors_step_both(tiny_store, tmp_path):
    for method, follows in (("zskt", True), ("dfad", True), ("dafl", False), ("dfq", False)):
        runner = _runner(method, tmp_path / method, tiny_store)
        ctx, lr_g = runner.method.ctx, runner.method.cfg.lr_g
        for student_lr in (0.1, 0.025):
            ctx.student_lr = student_lr
            runner.method.on_epoch_start(0, warmup=False)
        want = lr_g * 0.25 if follows else lr_g
        assert runner.method.optimizer.param_groups[0]["lr"] == pytest.approx(want), method


def test_an_unknown_generator_is_one_line(tiny_store, tmp_path):
    result = CliRunner().invoke(cli, ["run", "--method", "dafl", *TINY_CLI, "--set", "method.generator=big",
                                      "--teacher-store", str(tiny_store), "--output", str(tmp_path)])
    assert_user_error(result, "method.generator must be one of authors, package")
    assert not any(tmp_path.iterdir())


# ---------------------------------------------------------------- DAFL

@pytest.mark.numeric
def test_dafl_information_entropy_term_balances_the_teachers_predictions(tiny_store, tmp_path):
    runner = _runner("dafl", tmp_path, tiny_store, **{"method.oh": 0.0, "method.act": 0.0, "method.g_steps": 10,
                                                       "synth_batch_size": 16})
    method, z = runner.method, torch.randn(32, runner.method.cfg.nz)
    with torch.no_grad():  # a confident teacher (the tiny one is near uniform on any input); same argmax
        runner.teacher.fc.weight.mul_(10)
        runner.teacher.fc.bias.mul_(10)
    # start from a generator whose images the teacher puts mostly in class 0
    skew = torch.optim.Adam(method.generator.parameters(), lr=0.01)
    for _ in range(10):
        logits = runner.teacher(method.network_input(method.generator(z)))
        skew.zero_grad()
        F.cross_entropy(logits, torch.zeros(len(z), dtype=torch.long)).backward()
        skew.step()
    before = _entropy_of_mean_prediction(_teacher_and_student(runner, z)[0])
    method.synthesize()
    after = _entropy_of_mean_prediction(_teacher_and_student(runner, z)[0])
    assert_effect(1.0, before, "entropy of the mean prediction: 1.0 over the skewed generator's")
    assert_effect(after, before + 0.5, "entropy of the mean prediction: after over before + 0.5")


def test_dafl_student_learns_from_the_generator_steps_own_batch(tiny_store, tmp_path):
    runner = _runner("dafl", tmp_path, tiny_store, **{"method.g_steps": 1})
    method, outputs = runner.method, []
    method.generator.register_forward_hook(lambda m, i, o: outputs.append(o.detach().clone()))
    method.synthesize()
    first, second = method.sample(8).images, method.sample(8).images
    assert torch.allclose(runner.normalizer(first), outputs[0], atol=1e-5)  # the batch the generator step made
    assert not torch.allclose(first, second)  # a second student step of the round gets a new batch


def test_dafl_without_batch_reuse_draws_every_student_batch(tiny_store, tmp_path):
    runner = _runner("dafl", tmp_path, tiny_store, **{"method.g_steps": 1, "method.reuse_batch": False})
    outputs = []
    runner.method.generator.register_forward_hook(lambda m, i, o: outputs.append(o.detach().clone()))
    runner.method.synthesize()
    images = runner.method.sample(8).images
    assert len(outputs) == 2 and not torch.allclose(runner.normalizer(images), outputs[0][:8], atol=1e-3)


# ---------------------------------------------------------------- DFAD

@pytest.mark.numeric
def test_dfad_generator_steps_widen_the_l1_gap_on_a_fixed_z(tiny_store, tmp_path):
    # the student's BN stays in eval mode here so only the generator moves; 30 steps widen the gap by
    # about 0.27, 9 times what three CPU kernel paths move it (10 steps: 0.13, 4 times)
    runner = _runner("dfad", tmp_path, tiny_store, **{"method.g_steps": 30, "method.student_bn_train": False})
    z = torch.randn(32, runner.method.cfg.nz)
    before = F.l1_loss(*_teacher_and_student(runner, z)).item()
    runner.method.synthesize()
    after = F.l1_loss(*_teacher_and_student(runner, z)).item()
    assert_effect(after, before, "teacher-student L1 on a fixed z: after the round over before")


def test_the_l1_loss_is_the_mean_absolute_logit_difference(tiny_store, tmp_path):
    runner = _runner("dfad", tmp_path, tiny_store)
    assert runner.cfg.loss == "l1"
    s, t = torch.tensor([[1.0, -2.0], [0.5, 0.0]]), torch.tensor([[0.0, 0.0], [0.5, 3.0]])
    value = runner.loss_fn(Outputs(None, s), Outputs(None, t), None)["l1"]
    assert value.item() == pytest.approx((1 + 2 + 0 + 3) / 4)


# ---------------------------------------------------------------- ZSKT

def test_attention_transfer_is_zero_for_identical_maps_scale_free_and_positive_otherwise():
    torch.manual_seed(0)
    maps = [torch.randn(4, 8, 6, 6), torch.randn(4, 16, 3, 3)]
    assert attention_transfer(maps, maps).item() == 0
    assert attention_transfer([2 * m for m in maps], maps).item() == pytest.approx(0, abs=1e-12)
    assert attention_transfer([torch.randn_like(m) for m in maps], maps).item() > 0


@pytest.mark.numeric
def test_zskt_generator_steps_raise_the_kl_on_the_rounds_pseudo_batch(tiny_store, tmp_path):
    runner = _runner("zskt", tmp_path, tiny_store, **{"method.g_steps": 10})
    batch = runner.method.synthesize()
    kl = [-v for v in batch.loss_curve]  # every step on the same latent batch
    assert_effect(kl[-1], kl[0], "KL on the pseudo batch: last step over first")


def test_zskt_student_steps_of_a_round_share_its_pseudo_batch(tiny_store, tmp_path):
    runner = _runner("zskt", tmp_path, tiny_store, **{"method.g_steps": 1})
    method = runner.method
    method.synthesize()
    a, b = method.sample(8).images, method.sample(8).images
    method.synthesize()
    c = method.sample(8).images
    assert torch.equal(a, b) and not torch.allclose(a, c)


@pytest.mark.parametrize("fixed_batch", (True, False))
def test_zskt_counts_its_pseudo_batch_once_however_often_the_student_learns_from_it(fixed_batch, tiny_store,
                                                                                    tmp_path):
    runner = tiny_runner("zskt", tmp_path / "run", tiny_store,
                         {"method.fixed_batch": fixed_batch, "ep_steps": 6, "kd_steps": 3, "epochs": 1})
    summary = runner.run()
    cfg = runner.cfg
    rounds, per_step = cfg.epochs * cfg.rounds_per_epoch, cfg.batch_size
    made = rounds * per_step if fixed_batch else rounds * cfg.kd_steps * per_step  # new images only
    assert cfg.kd_steps > 1 and summary["images"] == made


def test_paper_presets_train_the_student_as_the_authors_code():
    cfg, _, _ = resolve_config("zskt", "paper")  # solver.py: Adam, clipped
    assert (cfg.optimizer, cfg.lr, cfg.weight_decay, cfg.grad_clip) == ("adam", 2e-3, 0.0, 5.0)
    cfg, _, _ = resolve_config("dafl", "paper")  # DAFL-train.py's adjust_learning_rate
    assert (cfg.optimizer, cfg.lr_schedule, cfg.lr_milestones, cfg.lr_gamma) == ("sgd", "step", (800, 1600), 0.1)
    cfg, _, _ = resolve_config("dfad", "paper")  # DFAD_cifar.py --scheduler
    assert (cfg.optimizer, cfg.lr_schedule, cfg.lr_milestones, cfg.lr_gamma) == ("sgd", "step", (99, 199), 0.1)
    # the datafree package as CMI's datafree_kd.py runs it: cosine to 0 (l.290)
    for method, preset in (("dafl", "package"), ("zskt", "package"), ("dfq", "paper"), ("dfad", "package")):
        assert resolve_config(method, preset)[0].lr_min == 0.0, (method, preset)
    for method in ONLINE:  # the benchmark's presets keep the shared protocol's student
        for preset in ("quick", "cpu"):
            cfg, _, _ = resolve_config(method, preset)
            assert (cfg.optimizer, cfg.lr_schedule, cfg.grad_clip) == ("sgd", "cosine", 0.0)


@pytest.mark.parametrize("train_mode", (True, False))
def test_zskt_generator_step_runs_the_student_in_train_mode_as_the_authors(train_mode, tiny_store, tmp_path):
    runner = _runner("zskt", tmp_path, tiny_store, **{"method.student_bn_train": train_mode})
    bn = next(m for m in runner.student.modules() if isinstance(m, torch.nn.BatchNorm2d))
    before = bn.running_mean.clone()
    runner.method.synthesize()
    assert (not torch.equal(bn.running_mean, before)) == train_mode
    assert not runner.student.training  # handed back as the runner left it


def test_zskt_loss_vanishes_for_a_student_equal_to_the_teacher(tiny_store, tmp_path):
    runner = _runner("zskt", tmp_path, tiny_store)
    x = torch.randn(8, 3, 16, 16)

    def terms():
        with torch.no_grad():
            t_feat = runner.teacher.forward_features(x)  # as the runner's student step: teacher, then student
            t = Outputs(t_feat, runner.teacher.forward_head(t_feat))
            s_feat = runner.student.forward_features(x)
            return runner.loss_fn(Outputs(s_feat, runner.student.forward_head(s_feat)), t, None)

    fresh = terms()
    assert fresh["kd"] > 0 and fresh["at"] > 0
    runner.student.load_state_dict(runner.teacher.state_dict())
    same = terms()
    assert same["kd"].item() == pytest.approx(0, abs=1e-7) and same["at"].item() == pytest.approx(0, abs=1e-10)


def test_zskt_loss_refuses_networks_whose_stages_do_not_pair(tiny_store, tmp_path):
    with pytest.raises(DfkdError, match="loss.beta=0"):
        tiny_runner("zskt", tmp_path / "run", tiny_store, {"student": "resnet18"})
    tiny_runner("zskt", tmp_path / "kl-only", tiny_store, {"student": "resnet18", "loss.beta": 0.0})


# ---------------------------------------------------------------- DFQ

@pytest.mark.numeric
def test_dfq_bn_statistics_term_falls_over_generator_steps(tiny_store, tmp_path):
    runner = _runner("dfq", tmp_path, tiny_store, **{"method.g_steps": 12, "synth_batch_size": 16})
    method, z = runner.method, torch.randn(16, runner.method.cfg.nz)

    @torch.no_grad()
    def bn_term():
        method.generator.train()
        return bn_statistics_loss(runner.teacher, method.network_input(method.generator(z))).item()

    before = bn_term()
    method.synthesize()
    after = bn_term()
    assert_effect(0.8 * before, after, "BN-statistics term: 0.8 x before over after")
    assert not any(m._forward_hooks for m in runner.teacher.modules())  # hooked for the generator steps only


def test_dfq_samples_the_student_batches_with_the_generator_in_eval_mode(tiny_store, tmp_path):
    runner = _runner("dfq", tmp_path, tiny_store, **{"method.g_steps": 1})
    runner.method.synthesize()
    runner.method.sample(8)
    assert not runner.method.generator.training
    runner.method.synthesize()
    assert runner.method.generator.training
