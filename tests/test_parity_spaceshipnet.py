"""The parity harness's SpaceshipNet side (benchmarks/parity/spaceship.py) without the authors' checkout: the
protocol on our --set keys, recognizing the checkout, the network adapter their trainer calls, their options
object, the in-memory feature pool, and the driver loop on a stub of their code layout."""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from helpers import TINY

from benchmarks.parity import shims, spaceship
from benchmarks.parity.protocols import OUR_PRESET, REFERENCES, REPOS, ours_overrides, protocol
from benchmarks.parity.reference import run_reference
from dfkd_bench.config import resolve_config
from dfkd_bench.errors import DfkdError
from dfkd_bench.methods.spaceshipnet import SpaceshipNet, SpaceshipNetLoss, grad_cams
from dfkd_bench.registry import load_plugins
from dfkd_bench.zoo import create_model

# ---------------------------------------------------------------- the protocol


def test_the_protocol_maps_onto_spaceshipnet_settings_that_exist():
    load_plugins()
    proto = protocol("spaceshipnet")
    overrides = ours_overrides(proto)
    method_fields = {f.name for f in dataclasses.fields(SpaceshipNet.Config)}
    loss_fields = {f.name for f in dataclasses.fields(SpaceshipNetLoss.Config)}
    # every method./loss. key the protocol sets is a field of methods/spaceshipnet.py's Config or its loss's
    assert {k[7:] for k in overrides if k.startswith("method.")} <= method_fields
    assert {k[5:] for k in overrides if k.startswith("loss.")} == loss_fields == {"kd", "cam", "gradcam"}
    cfg, method_cfg, loss_cfg = resolve_config("spaceshipnet", OUR_PRESET, {**overrides, "loss": proto["loss"]},
                                               dataset=proto["dataset"], teacher=proto["teacher"],
                                               student=proto["student"])
    assert cfg.temperature == proto["T"] == 30.0  # C100:90
    assert cfg.batch_size == cfg.synth_batch_size == proto["batch_size"]  # their one batch_size
    assert (cfg.ep_steps, cfg.kd_steps, cfg.rounds_per_epoch) == (proto["kd_steps"], proto["kd_steps"], 1)
    assert method_cfg.cfe_p == proto["gen_mixup_cutmix_p"] == 0.7
    assert tuple(method_cfg.levels) == tuple(proto["conv_idx"]) == (0, 1, 2)
    assert (method_cfg.oh, method_cfg.bn, method_cfg.lr_g) == (0.5, 1.0, 1e-3)
    assert (loss_cfg.kd, loss_cfg.cam, loss_cfg.gradcam) == (proto["distill_alpha"], proto["lambda_mSARC_cam_mse"],
                                                             proto["lambda_mSARC_gradcams_mse"])
    assert REFERENCES["spaceshipnet"] == ("SpaceshipNet",) and REPOS["SpaceshipNet"] == "skgyu/SpaceshipNet"
    spaceship.check_supported(proto)


@pytest.mark.parametrize("change, fragment", [
    ({"synth_batch_size": 64}, "one batch_size"),
    ({"lr_min": 2e-4}, "no eta_min"),
    ({"warmup": 1}, "no warm-up"),
    ({"loss": "kl"}, "own student loss"),
    ({"momentum": 0.0}, "momentum 0.9"),
    ({"augment": False}, "augment must be true"),
])
def test_what_their_trainer_cannot_express_is_refused(change, fragment):
    with pytest.raises(DfkdError, match=fragment):
        spaceship.check_supported({**protocol("spaceshipnet"), **change})


# ---------------------------------------------------------------- the checkout


def _layout(root: Path) -> Path:
    marker = root / shims.SPACESHIP_MARKER
    marker.parent.mkdir(parents=True)
    marker.write_text("")
    return root


def test_detect_repo_recognizes_the_spaceshipnet_root_and_still_the_others(tmp_path):
    assert shims.detect_repo(_layout(tmp_path / "SpaceshipNet")) == "SpaceshipNet"
    csd = tmp_path / "CSD"
    (csd / "datafree" / "synthesis").mkdir(parents=True)
    (csd / "datafree" / "__init__.py").write_text("")
    (csd / "datafree" / "synthesis" / "csd.py").write_text("")
    assert shims.detect_repo(csd) == "CSD"
    # their code folder itself is not the repository root; nor is a root without the V37 trainer
    with pytest.raises(DfkdError, match="not a checkout.*SpaceshipNet"):
        shims.detect_repo(tmp_path / "SpaceshipNet" / "code" / "SpaceshipNet")
    (tmp_path / "empty" / "code" / "SpaceshipNet").mkdir(parents=True)
    with pytest.raises(DfkdError, match="not a checkout"):
        shims.detect_repo(tmp_path / "empty")
    with pytest.raises(DfkdError, match="runs from a checkout of skgyu/SpaceshipNet"):
        spaceship.checkout_identity(csd)


# ---------------------------------------------------------------- the adapter, the options, the pool


def test_the_adapter_returns_their_tuple_and_hooks_the_stage_gradients():
    model = create_model("wrn16_1", 10, 1, 28).eval()
    net = spaceship.SpaceshipClassifier(model).eval()
    assert net.linear_attr == "fc" and getattr(net, net.linear_attr) is model.fc and net.linear_input_dim == 64
    x = torch.randn(3, 1, 28, 28)
    logits, pooled, last_map, stages = net(x)
    assert torch.allclose(logits, model(x), atol=1e-6)
    assert tuple(pooled.shape) == (3, 64) and tuple(last_map.shape) == (3, 64, 7, 7)
    assert torch.allclose(last_map, model.forward_features(x))  # their cam_feature: after the final BN-ReLU
    assert [tuple(s.shape[1:]) for s in stages] == [(16, 28, 28), (32, 14, 14), (64, 7, 7)]
    assert net.get_gradient() == []
    # their gradcam_cope (V37:29-43): gradients of the one-hot logit w.r.t. the parameters; the hooks keep the
    # stage gradients, deepest first, and the maps are the gradient-weighted channel sums of the stages read reversed
    net.do_save_gradient()
    logits, _, _, stages = net(x)
    target = logits.argmax(1)
    one_hot = torch.nn.functional.one_hot(target, 10)
    torch.autograd.grad(logits, net.parameters(), grad_outputs=one_hot, retain_graph=True)
    gradients = net.get_gradient()
    assert [tuple(g.shape[1:]) for g in gradients] == [(64, 7, 7), (32, 14, 14), (16, 28, 28)]
    theirs = [(g.mean([2, 3])[:, :, None, None] * s).sum(1) for g, s in zip(gradients[::-1], stages)]
    ours = grad_cams(logits, stages, target, retain_graph=True)  # methods/spaceshipnet.py's
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(theirs, ours))
    net.do_save_gradient(False)
    assert net.get_gradient() == [] and not net.bool_save_gradient
    net(x)  # hooks off: nothing recorded, and no hook registration under no gradient
    with torch.no_grad():
        net(x)
    assert net.get_gradient() == []
    with pytest.raises(DfkdError, match="Wide ResNet"):
        spaceship.SpaceshipClassifier(create_model("cifar_vgg8_bn", 10, 1, 28))


def test_the_options_object_reads_both_ways_nested_too():
    opt = spaceship.Options({"distill": {"alpha": 1, "T": 30}, "optimizer_S": {"lr": [0.1]}, "nets": [{"a": 1}]})
    assert opt.distill.T == opt["distill"]["T"] == 30 and "alpha_2" not in opt.distill
    assert opt.optimizer_S.lr[0] == opt["optimizer_S"]["lr"][0] == 0.1 and opt.nets[0].a == 1
    opt.max_epoch = 4
    opt["generator"] = {"img_size": 28}
    opt.update({"teacher_net": {"num_classes": 10}})
    assert opt["max_epoch"] == 4 and opt.generator.img_size == 28 and opt.teacher_net.num_classes == 10
    assert not hasattr(opt, "model_files") and "continue_train" not in opt
    del opt.max_epoch
    with pytest.raises(AttributeError):
        del opt.max_epoch


def test_the_in_memory_pool_keeps_every_round_in_order():
    pool = spaceship.InMemoryFeaturePool(root="unused", name="feature_label_images0.lmdb")
    for r in range(2):
        features = torch.full((3, 2, 4, 4), float(r)).numpy()
        pool.add(features, torch.arange(3).numpy(), torch.zeros(3, 1, 8, 8).numpy())
        features[:] = -1  # the pool holds copies, as their LMDB pickles do
    dataset = pool.get_dataset()
    assert len(dataset) == 6 and [float(dataset[i]["feature"][0, 0, 0]) for i in range(6)] == [0] * 3 + [1] * 3
    batch = next(iter(torch.utils.data.DataLoader(dataset, batch_size=4, shuffle=False)))
    assert tuple(batch["feature"].shape) == (4, 2, 4, 4) and batch["label"].tolist() == [0, 1, 2, 0]
    assert batch["feature"].dtype == torch.float32 and tuple(batch["image"].shape) == (4, 1, 8, 8)
    pool.add(torch.ones(1, 2, 4, 4).numpy(), torch.zeros(1).numpy(), torch.zeros(1, 1, 8, 8).numpy())
    assert len(dataset) == 6 and len(pool.get_dataset()) == 7  # a dataset is a snapshot, as theirs


# ---------------------------------------------------------------- the driver loop on a stub of their code

_CONFIG = """
model: model_CFE_mSARC_base
model_files: ['model_CFE_mSARC_base_V37']
max_epoch: 199
g_steps: 200
kd_steps: 2000
optimizer_G:
  lr: [0.001]
optimizer_S:
  lr: [0.1]
  lr_policy: CosineAnnealingLR
batch_size: 256
num_workers: 4
first_bn_multiplier: 1
generator:
  arc: StubGenerator
  ngf: 64
  img_size: 32
  nc: 3
  pretrained_loc:
  init: kaiming
  input_dim: 256
student_net:
  arc: ResNet18_1028
  init: xavier
  num_classes: 100
teacher_net:
  arc: ResNet34_1028
  pretrained_loc: 'pretrained/teacher.pth'
  num_classes: 100
"""

_NETWORKS = '''
import torch


def find_network(network_args):
    if network_args["arc"] != "StubGenerator":
        raise RuntimeError("...")
    return torch.nn.Linear(network_args["input_dim"], network_args["nc"] * network_args["img_size"] ** 2)
'''

_MODELS = '''
import json
import os

import torch

import networks
import datafree.utils._utils as pools

LOG = {log!r}


def log(event, **info):
    with open(LOG, "a") as fh:
        fh.write(json.dumps({{"event": event, **info}}) + "\\n")


class Trainer(torch.nn.Module):
    """A stand-in for model_CFE_mSARC_base with V37 loaded: what it reads of opt, a call log."""

    def initialize(self, opt):
        self.opt = opt
        self.student_net = networks.find_network(opt["student_net"])
        self.teacher_net = networks.find_network(opt.teacher_net)
        self.generator = networks.find_network(opt["generator"])
        self.optimizer_S = torch.optim.SGD(self.student_net.parameters(), opt.optimizer_S.lr[0], momentum=0.9,
                                           weight_decay=opt.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(self.optimizer_S, T_max=opt.max_epoch + 1)
        self.sub_num = torch.Tensor(opt["prin_normalize"][0]).view(1, 3, 1, 1).cuda()
        self.pool = getattr(pools, opt.FeatureLabelImagePoolType)(root=opt.expr_dir, name="feature0.lmdb")
        log("init", cwd_has_v37=os.path.isfile("models/model_CFE_mSARC_bases/model_CFE_mSARC_base_V37.py"),
            student=type(self.student_net).__name__, teacher=type(self.teacher_net).__name__,
            teacher_training=self.teacher_net.training, generator=type(self.generator).__name__,
            student_init=opt.student_net.init, T=opt.distill.T, alpha=opt["distill"]["alpha"],
            conv_idx=opt.conv_idx, g_steps=opt.g_steps, kd_steps=opt.kd_steps, batch_size=opt.batch_size,
            num_workers=opt.num_workers, img_size=opt.generator.img_size, nc=opt.generator.nc, device=str(opt.device))

    def trainstate(self):
        self.student_net.train()
        log("trainstate", epoch=self.iepoch)

    def evalstate(self):
        self.student_net.eval()
        log("evalstate")

    def clear_loss(self):
        log("clear_loss")

    def optimize_step(self):
        self.train_G()
        self.train_S()

    def train_G(self):
        log("train_G")

    def train_S(self):
        self.record_batchimg(None, 1)
        x = torch.randn(4, 3, 16, 16)
        loss = self.student_net((x - self.sub_num))[0].logsumexp(1).mean()
        self.optimizer_S.zero_grad()
        loss.backward()
        self.optimizer_S.step()
        log("train_S", teacher_requires_grad=next(self.teacher_net.parameters()).requires_grad)

    def record_batchimg(self, *args, **kwargs):
        raise TypeError("make_grid() got an unexpected keyword argument 'range'")

    def update_learning_rate(self, epoch):
        self.scheduler.step()
        log("update_learning_rate", epoch=epoch)


def create_model(opt):
    model = Trainer()
    model.initialize(opt)
    return model
'''


def _stub_checkout(root: Path) -> Path:
    code = _layout(root) / shims.SPACESHIP_CODE
    (code / "scripts").mkdir()
    (code / spaceship.CONFIG).write_text(_CONFIG)
    (code / "networks").mkdir()
    (code / "networks" / "__init__.py").write_text(_NETWORKS)
    (code / "models" / "__init__.py").write_text("")
    (code / "models" / "models.py").write_text(textwrap.dedent(_MODELS.format(log=str(root / "calls.jsonl"))))
    (code / "datafree" / "utils").mkdir(parents=True)
    (code / "datafree" / "utils" / "__init__.py").write_text("")
    (code / "datafree" / "utils" / "_utils.py").write_text("")
    return root


def test_the_reference_runner_drives_their_trainer_through_the_driver_loop(tmp_path, tiny_store):
    checkout = _stub_checkout(tmp_path / "SpaceshipNet")
    proto = {**protocol("spaceshipnet"), "dataset": TINY, "teacher": "wrn16_1", "student": "wrn16_1", "rounds": 2,
             "g_steps": 1, "kd_steps": 2, "batch_size": 8, "synth_batch_size": 8}
    job = {"method": "spaceshipnet", "protocol": proto, "seed": 0, "checkout": str(checkout),
           "work_dir": str(tmp_path / "work"), "teacher_store": str(tiny_store)}
    cwd, original_cuda = os.getcwd(), torch.Tensor.cuda
    result = run_reference(job, echo=lambda line: None)
    calls = [json.loads(line) for line in (checkout / "calls.jsonl").read_text().splitlines()]
    init = calls[0]
    assert init["cwd_has_v37"]  # their working directory while the trainer is built
    assert (init["student"], init["teacher"], init["generator"]) == ("SpaceshipClassifier", "SpaceshipClassifier",
                                                                   "Linear")
    assert not init["teacher_training"] and init["student_init"] is None and init["device"] == "cpu"
    assert (init["T"], init["alpha"], init["conv_idx"]) == (30.0, 1.0, [0, 1, 2])
    assert (init["g_steps"], init["kd_steps"], init["batch_size"], init["num_workers"]) == (1, 2, 8, 0)
    assert (init["img_size"], init["nc"]) == (16, 3)  # the tiny dataset's images
    one_epoch = ["trainstate", "clear_loss", "train_G", "train_S", "evalstate", "update_learning_rate"]
    assert [c["event"] for c in calls[1:]] == one_epoch * 2
    assert [c["epoch"] for c in calls if c["event"] == "trainstate"] == [0, 1]
    assert [c["epoch"] for c in calls if c["event"] == "update_learning_rate"] == [1, 2]
    assert all(c["teacher_requires_grad"] for c in calls if c["event"] == "train_S")
    # the result record of the other references, timed by phase
    assert result["status"] == "complete" and result["reference"]["repo"] == "SpaceshipNet"
    assert result["reference"]["github"] == "skgyu/SpaceshipNet" and len(result["reference"]["sources_sha256"]) == 64
    assert [r["round"] for r in result["rounds"]] == [1, 2]
    assert [r["lr"] for r in result["rounds"]] == pytest.approx([0.1, 0.05])  # T_max = max_epoch + 1 = rounds
    for key in ("acc", "synth_seconds", "distill_seconds", "eval_seconds", "synth_cpu_seconds",
                "distill_cpu_seconds"):
        assert all(key in r for r in result["rounds"]), key
    assert all(r["distill_seconds"] > 0 for r in result["rounds"])
    assert {"cuda-noop", "find-network-zoo", "feature-pool-in-memory", "debug-dumps-off"} <= set(result["shims"])
    assert "normalize-channels" not in result["shims"]  # three channels: their (1, 3, 1, 1) view fits
    # everything is back: working directory, patches, sys.path, their modules
    assert os.getcwd() == cwd and torch.Tensor.cuda is original_cuda
    assert not any(str(checkout) in str(getattr(m, "__file__", None)) for m in list(sys.modules.values()))
    assert "networks" not in sys.modules and "datafree.utils._utils" not in sys.modules
    assert not any("SpaceshipNet" in p for p in sys.path)
    assert not (tmp_path / "work" / "spaceshipnet").exists()
