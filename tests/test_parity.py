"""The parity harness (benchmarks/parity) without the authors' checkouts: the protocol -> --set
mapping, the tables, skipping finished runs, the shims, and the reference runner's loop on a stub
package that mimics the authors' synthesizer interface."""

from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.utils.data
from click.testing import CliRunner
from helpers import TINY

from benchmarks.parity import shims
from benchmarks.parity.__main__ import cli
from benchmarks.parity.protocols import (
    LONG_ROUNDS,
    ONLINE,
    OUR_PRESET,
    PROTOCOLS,
    ours_overrides,
    protocol,
    protocol_sha,
)
from benchmarks.parity.reference import run_reference
from benchmarks.parity.sweep import RunSpec, existing_result, ours_rounds, plan
from benchmarks.parity.table import write_tables
from dfkd_bench.config import resolve_config
from dfkd_bench.errors import DfkdError
from dfkd_bench.registry import get_preset, load_plugins
from dfkd_bench.zoo import create_model

# ---------------------------------------------------------------- protocol -> our --set keys


@pytest.mark.parametrize("method", list(PROTOCOLS))
def test_every_protocol_resolves_on_our_side_with_nothing_left_to_the_preset(method):
    load_plugins()
    proto = protocol(method)
    overrides = ours_overrides(proto)
    cfg, method_cfg, loss_cfg = resolve_config(method, OUR_PRESET, {**overrides, "loss": proto["loss"]},
                                               dataset=proto["dataset"], teacher=proto["teacher"],
                                               student=proto["student"])
    ep_steps = proto.get("ep_steps", proto["kd_steps"])
    assert (cfg.epochs, cfg.ep_steps, cfg.kd_steps) == (proto["rounds"], ep_steps, proto["kd_steps"])
    if method in ONLINE:  # an epoch of several generator rounds, each followed by kd_steps student steps
        assert cfg.rounds_per_epoch == ep_steps // proto["kd_steps"] > 1
    else:
        assert cfg.rounds_per_epoch == 1  # a round is an epoch: accuracy after every round
    assert (cfg.lr, cfg.lr_min, cfg.weight_decay, cfg.temperature, cfg.warmup_epochs) == (
        proto["lr"], proto["lr_min"], proto["weight_decay"], proto["T"], proto["warmup"])
    assert (cfg.batch_size, cfg.synth_batch_size, cfg.kd_augment) == (proto["batch_size"], proto["synth_batch_size"],
                                                                     method not in ONLINE)
    assert method_cfg.g_steps == proto["g_steps"] and method_cfg.lr_g == proto["lr_g"]
    for key in ("bn", "oh", "adv", "csd", "cr", "cr_T", "tv", "l2", "lr_z", "nz", "ngf", "balance"):
        if key in proto:
            assert getattr(method_cfg, key) == proto[key], key
    if "bn_mmt" in proto:
        assert method_cfg.bn_momentum == proto["bn_mmt"]
    if method == "fast_meta":
        assert method_cfg.meta == "maml"
    for key in ("le_emb_size", "g_life", "g_loops", "gwp_loops", "label_embeddings"):
        if key in proto:
            assert getattr(method_cfg, key) == proto[key], key
    if method == "csd":
        assert (loss_cfg.fea, loss_cfg.ce) == (proto["fea"], proto["ce"])
    # a preset value the protocol did not override would silently change our side
    leaked = [k for k in get_preset(method, OUR_PRESET) if k not in overrides]
    assert not leaked, leaked


def test_a_protocol_key_without_our_equivalent_is_refused():
    with pytest.raises(DfkdError, match="no dfkd-bench equivalent"):
        ours_overrides({**protocol("fast"), "reset_l0": 1})


def test_rounds_override_changes_the_fingerprint():
    assert protocol("csd", rounds=2)["rounds"] == 2
    assert protocol_sha(protocol("csd", rounds=2)) != protocol_sha(protocol("csd"))
    with pytest.raises(DfkdError, match="no parity protocol"):
        protocol("nope")


def test_the_long_horizon_lengthens_only_the_rounds_and_only_where_state_persists():
    for method, rounds in LONG_ROUNDS.items():
        long, short = protocol(method, horizon="long"), protocol(method)
        assert long == {**short, "rounds": rounds} and rounds > short["rounds"]
        assert protocol_sha(long) != protocol_sha(short)
    with pytest.raises(DfkdError, match="no long horizon for 'deepinversion'"):
        protocol("deepinversion", horizon="long")


# ---------------------------------------------------------------- results, skipping, tables


def _result(method: str, side: str, seed: int, accs: list[float], synth: float, distill: float,
            proto: dict | None = None, **extra) -> dict:
    proto = proto or protocol(method, rounds=len(accs))
    rounds = [{"round": i + 1, "acc": a, "lr": 0.1, "synth_seconds": synth, "distill_seconds": distill}
              for i, a in enumerate(accs)]
    return {"method": method, "side": side, "seed": seed, "status": "complete", "protocol": proto,
            "protocol_sha": protocol_sha(proto), "ours_set": {}, "rounds": rounds,
            "cpu_seconds": (synth + distill) * len(accs), **extra}


def _write(output: Path, result: dict) -> None:
    path = output / result["method"] / f"{result['side']}-s{result['seed']}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result))


def _table_row(text: str, side: str) -> list[str]:
    row = next(line for line in text.splitlines() if line.startswith(f"| {side} |"))
    return [c.strip() for c in row.strip("|").split("|")]


def test_table_gives_mean_std_over_seeds_the_gap_and_the_time_ratio(tmp_path):
    ref = {"repo": "CSD", "commit": None, "sources_sha256": "ab" * 32}
    for seed, final in enumerate([80.0, 81.0, 82.0]):
        _write(tmp_path, _result("csd", "theirs-CSD", seed, [50.0] * 9 + [final], 6.0, 4.0, reference=ref))
    for seed, final in enumerate([79.0, 80.0, 81.0]):
        _write(tmp_path, _result("csd", "ours", seed, [40.0 + seed] * 9 + [final], 3.0, 2.0))
    text = write_tables(tmp_path, every=5)
    head = _table_row(text, "side")
    theirs, ours = _table_row(text, "theirs-CSD"), _table_row(text, "ours")
    col = dict(zip(head, range(len(head))))
    assert theirs[col["n"]] == "3" and theirs[col["seeds"]] == "0,1,2"
    assert theirs[col["final (r10)"]] == "81.00 ± 1.00"
    assert ours[col["acc r5"]] == "41.00 ± 1.00"
    assert ours[col["Δ final"]] == "-1.00" and theirs[col["Δ final"]] == "-"
    assert theirs[col["s/round"]] == "10.0 ± 0.0" and ours[col["s/round"]] == "5.0 ± 0.0"
    assert ours[col["ratio"]] == "0.50" and ours[col["CPU ratio"]] == "0.50"
    assert (tmp_path / "csd" / "table.md").read_text() in (tmp_path / "parity.md").read_text()
    assert "luoshiya/CSD" in text


def test_table_refuses_to_average_two_protocols(tmp_path):
    _write(tmp_path, _result("fast", "ours", 0, [50.0] * 2, 1.0, 1.0))
    _write(tmp_path, _result("fast", "ours", 1, [50.0] * 3, 1.0, 1.0))
    with pytest.raises(DfkdError, match="mixes runs of 2 protocols"):
        write_tables(tmp_path)


def test_a_finished_run_is_skipped_and_one_of_another_protocol_refused(tmp_path):
    proto = protocol("fast", rounds=2)
    spec = RunSpec("fast", "ours", 0, proto)
    assert existing_result(spec, tmp_path) is None
    _write(tmp_path, _result("fast", "ours", 0, [50.0, 60.0], 1.0, 1.0, proto=proto))
    assert existing_result(spec, tmp_path)["rounds"][-1]["acc"] == 60.0
    with pytest.raises(DfkdError, match="another protocol"):
        existing_result(RunSpec("fast", "ours", 0, protocol("fast", rounds=3)), tmp_path)
    with pytest.raises(DfkdError, match="other --ours-set"):
        existing_result(RunSpec("fast", "ours", 0, proto, ours_set={"method.adv": "0"}), tmp_path)


def test_run_command_skips_finished_runs_and_writes_the_table(tmp_path):
    _write(tmp_path, _result("fast", "ours", 0, [50.0, 60.0], 1.0, 1.0))
    result = CliRunner().invoke(cli, ["run", "--method", "fast", "--sides", "ours", "--rounds", "2",
                                      "--output", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "1 runs, 1 already finished, 0 to do" in result.output
    assert "| ours | 1 | 0 | 60.00 |" in result.output
    assert (tmp_path / "fast" / "table.md").is_file()


def test_plan_pairs_sides_per_seed_and_needs_a_label_for_variants():
    protos = {"fast": protocol("fast")}
    specs = plan(["fast"], protos, [0, 1], ["ours"], {})
    assert [s.name for s in specs] == ["ours-s0", "ours-s1"]
    assert [s.name for s in plan(["fast"], protos, [0], ["ours"], {}, "adv0", {"method.adv": "0"})] == ["ours-adv0-s0"]
    with pytest.raises(DfkdError, match="--label"):
        plan(["fast"], protos, [0], ["ours"], {}, "", {"method.adv": "0"})
    with pytest.raises(DfkdError, match="unknown setting|no setting|method.nope"):
        plan(["fast"], protos, [0], ["ours"], {}, "bad", {"method.nope": "1"})
    with pytest.raises(DfkdError, match="needs a checkout"):
        plan(["fast"], protos, [0], ["theirs"], {})


@pytest.mark.parametrize("args, fragment", [
    (["run", "--method", "fast", "--reference", "{tmp}"], "not a checkout of the authors' code"),
    (["run", "--method", "nope", "--sides", "ours"], "unknown method"),
    (["run", "--method", "fast", "--sides", "ours", "--seeds", "0,x"], "--seeds takes integers"),
    (["table", "{tmp}/missing"], "not a folder of parity results"),
])
def test_bad_input_is_one_line_and_exit_code_2(tmp_path, args, fragment):
    result = CliRunner().invoke(cli, [a.replace("{tmp}", str(tmp_path)) for a in args])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], result.stderr


def test_our_rounds_are_read_back_from_running_totals(tmp_path):
    records = [{"epoch": 0, "test_acc": 40.0, "lr": 0.05, "synth_seconds": 2.0, "distill_seconds": 3.0},
               {"epoch": 1, "test_acc": 55.0, "lr": 0.0, "synth_seconds": 5.0, "distill_seconds": 7.0}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    rounds = ours_rounds(tmp_path, lr0=0.1)
    assert [(r["round"], r["acc"], r["lr"]) for r in rounds] == [(1, 40.0, 0.1), (2, 55.0, 0.05)]
    assert [(r["synth_seconds"], r["distill_seconds"]) for r in rounds] == [(2.0, 3.0), (3.0, 4.0)]


# ---------------------------------------------------------------- shims


def test_classifier_interface_has_the_authors_feature_meaning():
    model = create_model("wrn16_1", 10, 1, 28).eval()
    wrapped = shims.ClassifierInterface(model)
    x = torch.randn(3, 1, 28, 28)
    logits, (f1, f2, f3, f4) = wrapped(x, return_features=True)
    assert torch.allclose(logits, model(x), atol=1e-6) and torch.equal(wrapped(x), logits)
    assert [tuple(f.shape[1:]) for f in (f1, f2, f3)] == [(16, 28, 28), (32, 14, 14), (64, 7, 7)]
    assert tuple(f4.shape) == (3, 64)
    assert not torch.allclose(f3, model.forward_features(x))  # f3 is taken before the final BN-ReLU
    assert torch.allclose(f4, model.forward_head(model.forward_features(x), pre_logits=True), atol=1e-6)
    pooled_logits, pooled = shims.ClassifierInterface(model, pooled_features=True)(x, return_features=True)
    assert torch.equal(pooled_logits, logits) and torch.equal(pooled, f4)  # CMI's, Fast's, NAYER's meaning
    with pytest.raises(DfkdError, match="Wide ResNet"):
        shims.ClassifierInterface(create_model("cifar_vgg8_bn", 10, 1, 28))


def test_detect_repo_tells_the_five_repositories_apart(tmp_path):
    for repo, markers in [("CSD", ["csd.py"]), ("Fast-Datafree", ["fast.py"]), ("CMI", ["contrastive.py"]),
                          ("NAYER", ["nayer.py", "fast.py", "contrastive.py"]),  # NAYER ships Fast's files too
                          ("CPNet", ["cpnet.py", "nayer.py", "fast.py", "contrastive.py"])]:  # and CPNet NAYER's
        root = tmp_path / repo
        (root / "datafree" / "synthesis").mkdir(parents=True)
        (root / "datafree" / "__init__.py").write_text("")
        for marker in markers:
            (root / "datafree" / "synthesis" / marker).write_text("")
        assert shims.detect_repo(root) == repo
    with pytest.raises(DfkdError, match="not a checkout"):
        shims.detect_repo(tmp_path)


# ---------------------------------------------------------------- the reference loop on a stub package

_STUB = '''
"""A stand-in for the authors' datafree package: their constructor signatures, a call log."""
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


class AlignHead(nn.Module):
    def __init__(self, s_shape, t_shape):
        super().__init__()
        self.conv = nn.Conv2d(s_shape[1], t_shape[1], 1)

    def forward(self, x):
        return self.conv(x)


class KLDiv(nn.Module):
    def __init__(self, T=1.0, reduction="batchmean"):
        super().__init__()
        self.T = T

    def forward(self, logits, targets):
        return F.kl_div(F.log_softmax(logits / self.T, 1), F.softmax(targets / self.T, 1),
                        reduction="batchmean") * self.T ** 2


class Generator(nn.Module):
    def __init__(self, nz=100, ngf=64, img_size=32, nc=3):
        super().__init__()
        self.shape = (nc, img_size, img_size)
        self.l1 = nn.Linear(nz, nc * img_size * img_size)

    def forward(self, z):
        return torch.sigmoid(self.l1(z)).view(len(z), *self.shape)


class _Pool:
    """What every stub synthesizer shares: a generator-made pool and sampling from it."""

    def _setup(self, teacher, student, generator, nz, num_classes, synthesis_batch_size, sample_batch_size,
               normalizer, labeled):
        self.teacher, self.student, self.generator = teacher, student, generator
        self.nz, self.num_classes, self.normalizer, self.labeled = nz, num_classes, normalizer, labeled
        self.synthesis_batch_size, self.sample_batch_size = synthesis_batch_size, sample_batch_size
        self.images, self.targets = [], []
        log("init", cls=type(self).__name__)

    def synthesize(self):
        log("synthesize", student_training=self.student.training, teacher_training=self.teacher.training)
        with torch.no_grad():
            images = self.generator(torch.randn(self.synthesis_batch_size, self.nz))
        self.images.append(images)
        self.targets.append(torch.randint(self.num_classes, (len(images),)))
        return {{"synthetic": images}}

    def sample(self):
        images, targets = torch.cat(self.images), torch.cat(self.targets)
        idx = torch.randperm(len(images))[:self.sample_batch_size]
        log("sample", student_training=self.student.training)
        x = self.normalizer(images[idx])
        return (x, targets[idx]) if self.labeled else x


class CSDSynthesizer(_Pool):
    def __init__(self, teacher, student, generator, nz, num_classes, img_size, init_dataset=None, iterations=1,
                 lr_g=1e-3, lr=0.1, synthesis_batch_size=128, sample_batch_size=128, epochs=200, adv=0,
                 bn=0, oh=0, csd=0, normalizer=None, device='cpu', save_dir='run/csd', transform=None, dataset=None,
                 autocast=None, use_fp16=False, distributed=False):
        self._setup(teacher, student, generator, nz, num_classes, synthesis_batch_size, sample_batch_size,
                    normalizer, labeled=True)

    def train_head(self):
        log("train_head", student_training=self.student.training)

    def reset_head(self):
        log("reset_head")


class FastSynthesizer(_Pool):
    def __init__(self, teacher, student, generator, nz, num_classes, img_size, init_dataset=None, iterations=100,
                 lr_g=0.1, synthesis_batch_size=128, sample_batch_size=128, adv=0.0, bn=1, oh=1, save_dir='run/fast',
                 transform=None, autocast=None, use_fp16=False, normalizer=None, device='cpu', distributed=False,
                 lr_z=0.01, warmup=10, reset_l0=0, reset_bn=0, bn_mmt=0, is_maml=1):
        self._setup(teacher, student, generator, nz, num_classes, synthesis_batch_size, sample_batch_size,
                    normalizer, labeled=False)
        log("warmup", value=warmup)

    def synthesize(self, targets=None):
        return super().synthesize(), 0.0


class LargeGenerator(Generator):
    pass


class GenerativeSynthesizer:
    def __init__(self, teacher, student, generator, nz, img_size, iterations=1, lr_g=1e-3, synthesis_batch_size=128,
                 sample_batch_size=128, adv=0, bn=0, oh=0, act=0, balance=0, criterion=None, normalizer=None,
                 device='cpu', autocast=None, use_fp16=False, distributed=False):
        self.teacher, self.student, self.generator, self.nz = teacher, student, generator, nz
        self.sample_batch_size, self.normalizer = sample_batch_size, normalizer
        log("init", cls="GenerativeSynthesizer", act=act, balance=balance, adv=adv,
            criterion=type(criterion).__name__, criterion_T=getattr(criterion, "T", None))

    def synthesize(self):
        _, features = self.teacher(self.normalizer(self.generator(torch.randn(2, self.nz))), return_features=True)
        log("synthesize", student_training=self.student.training, features=list(features.shape))
        return {{"synthetic": None}}

    def sample(self):
        log("sample", student_training=self.student.training)
        with torch.no_grad():
            return self.normalizer(self.generator(torch.randn(self.sample_batch_size, self.nz)))


class NLGenerator(nn.Module):
    def __init__(self, ngf=64, img_size=32, nc=3, nl=100, label_emb=None, le_emb_size=256, le_size=512, sbz=200):
        super().__init__()
        log("nlgenerator", nl=nl, le_size=le_size, sbz=sbz, le_emb_size=le_emb_size, label_emb=label_emb.tolist())
        self.shape = (nc, img_size, img_size)
        self.l1 = nn.Linear(le_size, nc * img_size * img_size)

    def forward(self, z):
        return torch.sigmoid(self.l1(z)).view(len(z), *self.shape)


class NAYER(_Pool):
    def __init__(self, teacher, student, generator, num_classes, img_size, init_dataset=None, g_steps=100,
                 lr_g=0.1, synthesis_batch_size=128, sample_batch_size=128, adv=0.0, bn=1, oh=1,
                 save_dir='run/fast', transform=None, autocast=None, use_fp16=False, normalizer=None, device='cpu',
                 distributed=False, warmup=10, bn_mmt=0, bnt=30, oht=1.5, cr_loop=1, g_life=50, g_loops=1,
                 gwp_loops=10, dataset="cifar10"):
        self._setup(teacher, student, generator, generator.l1.in_features, num_classes, synthesis_batch_size,
                    sample_batch_size, normalizer, labeled=False)
        log("nayer", warmup=warmup, g_life=g_life, g_loops=g_loops, gwp_loops=gwp_loops, bn_mmt=bn_mmt)

    def synthesize(self, targets=None):
        return super().synthesize(), 0.0, 0.0, 0.0
'''


def _stub_checkout(root: Path, repo_marker: str) -> Path:
    """A checkout layout with the stub as its datafree package (every submodule the runner touches)."""
    pkg = root / "datafree"
    for sub in ("synthesis", "models", "utils"):
        (pkg / sub).mkdir(parents=True)
    (pkg / "stub.py").write_text(textwrap.dedent(_STUB.format(log=str(root / "calls.jsonl"))))
    (pkg / "__init__.py").write_text("from . import synthesis, utils, criterions, models\n")
    (pkg / "synthesis" / "__init__.py").write_text(
        "from ..stub import CSDSynthesizer, FastSynthesizer, NAYER, GenerativeSynthesizer\n")
    (pkg / "synthesis" / repo_marker).write_text("")
    (pkg / "utils" / "__init__.py").write_text("from ..stub import Normalizer, AlignHead\n")
    (pkg / "criterions.py").write_text("from .stub import KLDiv\n")
    (pkg / "models" / "__init__.py").write_text("from . import generator\n")
    (pkg / "models" / "generator.py").write_text("from ..stub import Generator, NLGenerator, LargeGenerator\n")
    return root


def _tiny_job(method: str, checkout: Path, store: Path, work: Path, **proto_changes) -> dict:
    proto = {**protocol(method), "dataset": TINY, "teacher": "wrn16_1", "student": "wrn16_1", "rounds": 2,
             "g_steps": 1, "kd_steps": 2, "batch_size": 8, "synth_batch_size": 8, **proto_changes}
    return {"method": method, "protocol": proto, "seed": 0, "checkout": str(checkout), "work_dir": str(work),
            "teacher_store": str(store)}


def _calls(checkout: Path) -> list[dict]:
    return [json.loads(line) for line in (checkout / "calls.jsonl").read_text().splitlines()]


def test_reference_runner_follows_the_csd_loop_on_a_stub(tmp_path, tiny_store):
    checkout = _stub_checkout(tmp_path / "CSD", "csd.py")
    original_cuda, original_loader = torch.Tensor.cuda, torch.utils.data.DataLoader
    result = run_reference(_tiny_job("csd", checkout, tiny_store, tmp_path / "work"), echo=lambda line: None)
    events = [c["event"] for c in _calls(checkout)]
    # CSD datafree_kd.py: synthesize, reset_head, then kd_steps x (sample, student step, train_head)
    one_round = ["synthesize", "reset_head", "sample", "train_head", "sample", "train_head"]
    assert events == ["init"] + one_round * 2
    calls = _calls(checkout)
    assert all(c["student_training"] for c in calls if c["event"] == "sample")
    assert all(not c["teacher_training"] for c in calls if c["event"] == "synthesize")
    assert [r["round"] for r in result["rounds"]] == [1, 2]
    assert [r["lr"] for r in result["rounds"]] == pytest.approx([0.1, 0.05])  # cosine over the 2 rounds
    assert all(0.0 <= r["acc"] <= 100.0 and r["distill_seconds"] > 0 for r in result["rounds"])
    assert result["reference"]["repo"] == "CSD" and result["status"] == "complete"
    assert "dataloader-workers-0" in result["shims"]
    # everything the shims touched is back, and the stub package is forgotten
    assert torch.Tensor.cuda is original_cuda and torch.utils.data.DataLoader is original_loader
    assert "datafree" not in sys.modules and str(checkout) not in sys.path
    assert not (tmp_path / "work" / "pool").exists()


def test_reference_runner_keeps_fast_warm_up_rounds_free_of_student_steps(tmp_path, tiny_store):
    checkout = _stub_checkout(tmp_path / "Fast-Datafree", "fast.py")
    job = _tiny_job("fast", checkout, tiny_store, tmp_path / "work", rounds=3, warmup=1)
    result = run_reference(job, echo=lambda line: None)
    events = [c["event"] for c in _calls(checkout)]
    assert events == ["init", "warmup", "synthesize", "synthesize", "sample", "sample", "synthesize", "sample",
                      "sample"]
    assert _calls(checkout)[1]["value"] == 1
    # Fast-Datafree steps its scheduler only after the warm-up, over rounds - warm-up, down to 2e-4
    assert [r["lr"] for r in result["rounds"]] == pytest.approx([0.1, 0.1, 0.1 / 2 + 2e-4 / 2])
    assert result["rounds"][0]["distill_seconds"] < result["rounds"][1]["distill_seconds"]


def test_reference_runner_builds_nayer_on_one_hot_embeddings_and_keeps_its_warm_up(tmp_path, tiny_store):
    checkout = _stub_checkout(tmp_path / "NAYER", "nayer.py")
    job = _tiny_job("nayer", checkout, tiny_store, tmp_path / "work", rounds=3, warmup=1)
    result = run_reference(job, echo=lambda line: None)
    calls = _calls(checkout)
    assert [c["event"] for c in calls] == ["nlgenerator", "init", "nayer", "synthesize", "synthesize", "sample",
                                           "sample", "synthesize", "sample", "sample"]
    proto = job["protocol"]
    built = calls[0]
    # one-hot rows of the tiny dataset's classes, one noisy layer input per class, the protocol's widths
    assert built["label_emb"] == torch.eye(built["nl"]).tolist() and built["le_size"] == built["nl"]
    assert (built["sbz"], built["le_emb_size"]) == (proto["synth_batch_size"], proto["le_emb_size"])
    assert {k: calls[2][k] for k in ("warmup", "g_life", "g_loops", "gwp_loops", "bn_mmt")} == {
        "warmup": 1, **{k: proto[k] for k in ("g_life", "g_loops", "gwp_loops", "bn_mmt")}}
    # NAYER's datafree_kd.py: the scheduler waits for the warm-up, then anneals over rounds - warm-up to 2e-4
    assert [r["lr"] for r in result["rounds"]] == pytest.approx([0.1, 0.1, 0.1 / 2 + 2e-4 / 2])
    assert result["reference"]["repo"] == "NAYER"


def test_reference_runner_runs_dfq_as_cmis_loop_several_rounds_per_epoch(tmp_path, tiny_store):
    checkout = _stub_checkout(tmp_path / "CMI", "contrastive.py")
    job = _tiny_job("dfq", checkout, tiny_store, tmp_path / "work", ep_steps=4, kd_steps=2)
    result = run_reference(job, echo=lambda line: None)
    calls = _calls(checkout)
    # CMI datafree_kd.py:337: ep_steps // kd_steps = 2 cycles of (synthesize, kd_steps samples) per epoch
    cycle = ["synthesize", "sample", "sample"]
    assert [c["event"] for c in calls] == ["init"] + cycle * 4
    init = calls[0]
    assert (init["act"], init["balance"], init["adv"]) == (0.0, 20.0, 1.0)  # the DFQ script's weights
    assert (init["criterion"], init["criterion_T"]) == ("KLDiv", 1.0)  # the package's generator criterion
    # CMI's WideResNet hands back the pooled features, not CSD's list of block outputs
    assert all(c["features"] == [2, 64] for c in calls if c["event"] == "synthesize")
    assert [r["round"] for r in result["rounds"]] == [1, 2]  # evaluated once per epoch
    assert all(r["distill_seconds"] > 0 for r in result["rounds"])


def test_reference_runner_refuses_what_their_code_cannot_express(tmp_path, tiny_store):
    checkout = _stub_checkout(tmp_path / "CSD", "csd.py")
    with pytest.raises(DfkdError, match="only Fast's and NAYER's synthesizers know a warm-up"):
        run_reference(_tiny_job("csd", checkout, tiny_store, tmp_path / "w", warmup=1))
    with pytest.raises(DfkdError, match="zju-vipa/Fast-Datafree"):
        run_reference(_tiny_job("fast", checkout, tiny_store, tmp_path / "w"))
    cmi = _stub_checkout(tmp_path / "CMI", "contrastive.py")
    with pytest.raises(DfkdError, match="augment must be false for 'dfq'"):
        run_reference(_tiny_job("dfq", cmi, tiny_store, tmp_path / "w", augment=True))
