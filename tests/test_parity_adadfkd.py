"""AdaDFKD in the parity harness (benchmarks/parity): the DFKD checkout told apart from CMI's, the protocol on our
side's --set keys, the refusals, and the reference loop (window start per synthesis, the self-paced student steps,
the adversarial weight after each epoch) on a stub package with the authors' signatures. One check runs their real
AdaSynthesizer for a few tiny steps when a checkout of ljrprocc/DFKD is at $DFKD_CHECKOUT (default /work/ref/DFKD)."""

from __future__ import annotations

import json
import os
import textwrap
from pathlib import Path

import pytest
import torch
from helpers import TINY

from benchmarks.parity import shims
from benchmarks.parity.protocols import ONLINE, OUR_PRESET, REFERENCES, REPOS, ours_overrides, protocol
from benchmarks.parity.reference import check_supported, run_reference
from dfkd_bench.config import resolve_config
from dfkd_bench.errors import DfkdError
from dfkd_bench.registry import load_plugins
from dfkd_bench.zoo import create_model

DFKD_CHECKOUT = Path(os.environ.get("DFKD_CHECKOUT", "/work/ref/DFKD"))


def _layout(root: Path, markers: list[str]) -> Path:
    (root / "datafree" / "synthesis").mkdir(parents=True)
    (root / "datafree" / "__init__.py").write_text("")
    for marker in markers:
        (root / "datafree" / "synthesis" / marker).write_text("")
    return root


def test_detect_repo_tells_dfkd_from_cmi_and_fast(tmp_path):
    # ljrprocc/DFKD is a CMI fork that also ships Fast's fast.py (its synthesis/ as at cd281c4)
    dfkd = _layout(tmp_path / "DFKD", ["adadfkd.py", "cudfkd.py", "fast.py", "fast_meta.py", "contrastive.py"])
    assert shims.detect_repo(dfkd) == "AdaDFKD" and REPOS["AdaDFKD"] == "ljrprocc/DFKD"
    assert shims.detect_repo(_layout(tmp_path / "CMI", ["contrastive.py"])) == "CMI"
    assert shims.detect_repo(_layout(tmp_path / "Fast", ["fast.py", "contrastive.py"])) == "Fast-Datafree"
    assert REFERENCES["adadfkd"] == ("AdaDFKD",) and "adadfkd" in ONLINE


def test_the_protocol_lands_on_our_adadfkd_settings():
    load_plugins()
    proto = protocol("adadfkd")
    overrides = ours_overrides(proto)
    cfg, method_cfg, loss_cfg = resolve_config("adadfkd", OUR_PRESET, {**overrides, "loss": proto["loss"]},
                                               dataset=proto["dataset"], teacher=proto["teacher"],
                                               student=proto["student"])
    assert (cfg.epochs, cfg.ep_steps, cfg.kd_steps, cfg.rounds_per_epoch) == (5, 200, 10, 20)
    assert (cfg.temperature, cfg.kd_augment, cfg.lr_min) == (proto["T"], False, 0.0)
    for key in ("g_steps", "lr_g", "nz", "bn", "oh", "adv", "act", "lmda_ent", "adv_type", "grad_adv", "hard",
                "length", "begin_fraction", "end_fraction", "tau"):
        assert getattr(method_cfg, key) == proto[key], key
    assert method_cfg.n_neg == proto["N_neg"] and proto["N_neg"] % proto["synth_batch_size"] == 0
    assert (loss_cfg.base, loss_cfg.s_nce, loss_cfg.tau, loss_cfg.lambda_0, loss_cfg.alpha) == (
        proto["base"], proto["s_nce"], proto["tau"], proto["lambda_0"], proto["alpha"])
    assert loss_cfg.curr == "log" and overrides["loss.curr"] == "log"  # their curr_log
    check_supported("adadfkd", "AdaDFKD", proto)  # their code can express it as it is


@pytest.mark.parametrize("change, fragment", [
    ({"N_neg": 4000}, "batch divides its size"),
    ({"curr_option": "none"}, "curr_option must be"),
    ({"base": "ce"}, "--loss is kl, l1 or l2"),
    ({"lr_min": 2e-4}, "anneals to 0"),
    ({"loss": "kl"}, "its own loss only"),
    ({"augment": True}, "augment must be false"),
    ({"warmup": 1}, "set warmup 0"),
])
def test_check_supported_refuses_what_their_adadfkd_cannot_run(change, fragment):
    with pytest.raises(DfkdError, match=fragment):
        check_supported("adadfkd", "AdaDFKD", {**protocol("adadfkd"), **change})
    with pytest.raises(DfkdError, match="ljrprocc/DFKD"):
        check_supported("adadfkd", "CMI", protocol("adadfkd"))


def test_the_adapter_takes_their_level_argument_at_zero_only():
    model = create_model("wrn16_1", 10, 1, 28).eval()
    wrapped = shims.ClassifierInterface(model, pooled_features=True)
    x = torch.randn(2, 1, 28, 28)
    logits, feat = wrapped(x, l=0, return_features=True)
    assert torch.allclose(logits, model(x), atol=1e-6) and tuple(feat.shape) == (2, 64)
    assert wrapped.fc.in_features == 64  # where AdaSynthesizer reads its queue's width
    with pytest.raises(DfkdError, match="l=1"):
        wrapped(x, l=1)


# ---------------------------------------------------------------- the reference loop on a stub package

_STUB = '''
"""A stand-in for ljrprocc/DFKD's datafree package: their signatures, a call log."""
import json
import torch
import torch.nn as nn
import torch.nn.functional as F

LOG = {log!r}


def log(event, **info):
    with open(LOG, "a") as fh:
        fh.write(json.dumps({{"event": event, **info}}) + "\\n")


class Normalizer:
    def __init__(self, mean, std):
        self.mean, self.std = mean, std

    def __call__(self, x, reverse=False):
        m = torch.tensor(self.mean).view(1, -1, 1, 1)
        s = torch.tensor(self.std).view(1, -1, 1, 1)
        return x * s + m if reverse else (x - m) / s


class KLDiv(nn.Module):
    def __init__(self, T=1.0, reduction="batchmean"):
        super().__init__()
        self.T = T
        log("kldiv", T=T)

    def forward(self, logits, targets):
        return F.kl_div(F.log_softmax(logits / self.T, 1), F.softmax(targets / self.T, 1),
                        reduction="batchmean") * self.T ** 2


class DCGAN_Generator_CIFAR10(nn.Module):
    def __init__(self, nz=100, ngf=128, nc=3, img_size=64, slope=0.2, d=2, type="normal", cond=False, n_emb=50,
                 widen_factor=1):
        super().__init__()
        log("generator", nz=nz, ngf=ngf, nc=nc, img_size=img_size, d=d, type=type, cond=cond,
            widen_factor=widen_factor)
        self.shape = (nc, img_size, img_size)
        self.l1 = nn.Linear(nz, nc * img_size * img_size)

    def forward(self, z, l=0, y=None):
        return torch.sigmoid(self.l1(z)).view(len(z), *self.shape)


class AdaSynthesizer:
    def __init__(self, teacher, student, G_list, num_classes, img_size, nz, iterations=100, lr_g=0.1,
                 synthesis_batch_size=128, sample_batch_size=128, save_dir="run/adadfkd", transform=None,
                 normalizer=None, device="cpu", use_fp16=False, distributed=False, lmda_ent=0.5, adv=0.10, oh=0, act=0,
                 l1=0.01, depth=2, adv_type="js", bn=0, T=5, memory=False, evaluator=None, tau=10, hard=1.0, mu=0.5,
                 k=1., mode="memory", neg=0.1, debug=False, n_neg=6144):
        self.teacher, self.student, self.G_list, self.nz = teacher, student, G_list, nz
        self.sample_batch_size, self.normalizer, self.adv = sample_batch_size, normalizer, adv
        log("init", n_G=len(G_list), img_size=img_size, nz=nz, iterations=iterations, lr_g=lr_g, lmda_ent=lmda_ent,
            adv=adv, oh=oh, act=act, adv_type=adv_type, bn=bn, T=T, memory=memory, tau=tau, hard=hard, k=k,
            n_neg=n_neg, distributed=distributed, teacher_width=teacher.fc.in_features)

    def synthesize(self, l=0, gv=None, hard_factor=0., warmup=False):
        self.student.eval()
        x = self.normalizer(self.G_list[l](torch.randn(2, self.nz)))
        _, feat = self.teacher(x, l=l, return_features=True)
        log("synthesize", hard_factor=hard_factor, warmup=warmup, adv=self.adv, features=list(feat.shape))
        return {{"synthetic": x}}

    @torch.no_grad()
    def sample(self, l=0):
        log("sample", l=l, student_training=self.student.training)
        return self.G_list[l](torch.randn(self.sample_batch_size, self.nz))


def difficulty_mining(t_feat, s_feat, hard_factor=0., tau=0.07, device="cpu"):
    log("mining", tau=tau, device=device, s_grad=s_feat.requires_grad, t_grad=t_feat.requires_grad)
    d = F.normalize(t_feat, dim=-1) @ F.normalize(s_feat, dim=-1).T
    return torch.zeros(()), F.cross_entropy(d / tau, torch.arange(len(d)))


def get_alpha_adv(epoch, args, ori_adv, type="constant"):
    log("alpha_adv", epoch=epoch, type=type, ori_adv=ori_adv, epochs=args.epochs, begin=args.begin_fraction,
        end=args.end_fraction, grad_adv=args.grad_adv, curr_option=args.curr_option)
    return ori_adv + 0.5 * (epoch + 1)


def curr_v(l, lamda, spl_type="hard"):
    log("curr_v", lamda=lamda, spl_type=spl_type, grad=torch.is_grad_enabled(), loss=l.item())
    return None, torch.tensor(0.5)


def lambda_scheduler(lambda_0, iter, alpha=0.0001, iter_0=500000000):
    log("lambda", iter=iter, alpha=alpha, lambda_0=lambda_0)
    return lambda_0 + alpha * iter
'''


def _stub_dfkd(root: Path) -> Path:
    pkg = root / "datafree"
    for sub in ("synthesis", "models", "utils", "datasets"):
        (pkg / sub).mkdir(parents=True)
    (pkg / "stub.py").write_text(textwrap.dedent(_STUB.format(log=str(root / "calls.jsonl"))))
    (pkg / "__init__.py").write_text("from . import synthesis, utils, criterions, models\n")  # not datasets: as theirs
    (pkg / "synthesis" / "__init__.py").write_text("from .adadfkd import AdaSynthesizer\n")
    (pkg / "synthesis" / "adadfkd.py").write_text("from ..stub import AdaSynthesizer\n")
    (pkg / "utils" / "__init__.py").write_text("from ..stub import Normalizer, difficulty_mining, get_alpha_adv\n")
    (pkg / "criterions.py").write_text("from .stub import KLDiv\n")
    (pkg / "models" / "__init__.py").write_text("from . import generator\n")
    (pkg / "models" / "generator.py").write_text("from ..stub import DCGAN_Generator_CIFAR10\n")
    (pkg / "datasets" / "__init__.py").write_text("")
    (pkg / "datasets" / "utils.py").write_text("from ..stub import curr_v, lambda_scheduler\n")
    return root


def _tiny_job(checkout: Path, store: Path, work: Path, **changes) -> dict:
    proto = {**protocol("adadfkd"), "dataset": TINY, "teacher": "wrn16_1", "student": "wrn16_1", "ep_steps": 2,
             "kd_steps": 1, "batch_size": 8, "synth_batch_size": 8, "N_neg": 16, **changes}
    return {"method": "adadfkd", "protocol": proto, "seed": 0, "checkout": str(checkout), "work_dir": str(work),
            "teacher_store": str(store)}


def test_reference_runner_drives_their_adadfkd_epoch_on_a_stub(tmp_path, tiny_store):
    checkout = _stub_dfkd(tmp_path / "DFKD")
    job = _tiny_job(checkout, tiny_store, tmp_path / "work")
    proto = job["protocol"]
    result = run_reference(job, echo=lambda line: None)
    calls = [json.loads(line) for line in (checkout / "calls.jsonl").read_text().splitlines()]
    kl = [c for c in calls if c["event"] == "kldiv"]
    calls = [c for c in calls if c["event"] != "kldiv"]
    events = [c["event"] for c in calls]
    # datafree_kd.py:559-599 builds the generator, then the synthesizer
    assert events[:2] == ["generator", "init"]
    step = ["sample", "lambda", "mining", "curr_v"]  # their train(), l.756-801
    epoch = (["synthesize"] + step) * 2 + ["alpha_adv"]  # ep_steps // kd_steps = 2 rounds, then l.681-682
    assert events[2:] == epoch * 5
    gen, init = calls[:2]
    assert (gen["nz"], gen["ngf"], gen["d"], gen["nc"], gen["img_size"], gen["cond"]) == (512, 64, 2, 3, 16, False)
    assert (gen["type"], gen["widen_factor"]) == ("wider", 1)  # l.373-378 for a wrn16_1 teacher
    assert {k: init[k] for k in ("lmda_ent", "adv", "oh", "act", "adv_type", "bn", "T", "tau", "hard")} == {
        k: proto[k] for k in ("lmda_ent", "adv", "oh", "act", "adv_type", "bn", "T", "tau", "hard")}
    assert (init["n_neg"], init["k"], init["memory"], init["n_G"], init["img_size"]) == (16, 0.9, False, 1, 16)
    assert init["teacher_width"] == 64 and {c["T"] for c in kl} == {proto["T"]}  # l.552-557: --loss kl at --T
    synth = [c for c in calls if c["event"] == "synthesize"]
    # l.672 over 5 epochs at fractions 0.25 / 0.75 and length 0.9: the window slides from epoch 2 on
    assert [c["hard_factor"] for c in synth[::2]] == pytest.approx([0.0, 0.0, 0.05, 0.1, 0.1])
    assert [c["warmup"] for c in synth[::2]] == [True, False, False, False, False]  # epoch < int(0.25 * 5)
    assert all(c["features"] == [2, 64] for c in synth)  # pooled features, through the adapter's l=0
    # the adversarial weight: the protocol's in epoch 0, then what get_alpha_adv gave after the epoch before
    assert [c["adv"] for c in synth[::2]] == [1.0, 1.5, 2.0, 2.5, 3.0]
    alpha = [c for c in calls if c["event"] == "alpha_adv"]
    assert [c["epoch"] for c in alpha] == [0, 1, 2, 3, 4] and {c["type"] for c in alpha} == {"linear"}
    assert (alpha[0]["epochs"], alpha[0]["curr_option"], alpha[0]["ori_adv"]) == (5, "curr_log", 1.0)
    # lambda after global_iter student steps, counted over the whole run, at the protocol's alpha
    lam = [c for c in calls if c["event"] == "lambda"]
    assert [c["iter"] for c in lam] == list(range(10)) and {c["alpha"] for c in lam} == {proto["alpha"]}
    mining = [c for c in calls if c["event"] == "mining"]
    assert all(c["tau"] == proto["tau"] and c["s_grad"] and not c["t_grad"] for c in mining)
    curr = [c for c in calls if c["event"] == "curr_v"]
    assert all(c["spl_type"] == "log" and not c["grad"] for c in curr)
    assert all(c["student_training"] for c in calls if c["event"] == "sample")
    assert result["reference"]["repo"] == "AdaDFKD" and "hard-factor-span-1" not in result["shims"]
    assert [r["round"] for r in result["rounds"]] == [1, 2, 3, 4, 5]
    assert result["rounds"][0]["lr"] == 0.1 and result["rounds"][-1]["lr"] < 0.02  # cosine to 0 over 5 epochs


def test_a_run_too_short_for_their_window_span_is_recorded(tmp_path, tiny_store):
    checkout = _stub_dfkd(tmp_path / "DFKD")
    # int(1 * (0.75 - 0.25)) = 0: datafree_kd.py:672 would divide by zero; the harness uses 1 and says so
    result = run_reference(_tiny_job(checkout, tiny_store, tmp_path / "work", rounds=1), echo=lambda line: None)
    assert "hard-factor-span-1" in result["shims"] and len(result["rounds"]) == 1


@pytest.mark.skipif(not (DFKD_CHECKOUT / "datafree" / "synthesis" / "adadfkd.py").is_file(),
                    reason="no ljrprocc/DFKD checkout (set DFKD_CHECKOUT)")
def test_their_adadfkd_runs_a_tiny_epoch_on_cpu_through_the_shims(tmp_path, tiny_store):
    job = _tiny_job(DFKD_CHECKOUT, tiny_store, tmp_path / "work", rounds=2)
    result = run_reference(job, echo=lambda line: None)
    assert result["reference"]["repo"] == "AdaDFKD" and "cuda-noop" in result["shims"]  # MoCo's labels.cuda()
    assert len(result["rounds"]) == 2 and all(0.0 <= r["acc"] <= 100.0 for r in result["rounds"])
