"""The parity protocols: one CPU-sized setting per method, shared by both sides, defined once.

Keys use the authors' flag names (``datafree_kd.py``), so the reference runner reads them as
they are; :func:`ours_overrides` maps them onto dfkd-bench's ``--set`` keys. One synthesis
round per epoch (their ``ep_steps == kd_steps``), so "round" and "epoch" coincide and the
student is evaluated after every round. CSD, the focus method, runs 15 rounds (about 17 CPU-minutes
per run on either side with one thread on this project's 2-core machine); the others run 5
rounds (5-7 CPU-minutes), which is what three seeds of both sides of every method fit into on
that machine. README.md, "Cost", has the measured times.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from dfkd_bench.errors import DfkdError

# luoshiya/CSD, zju-vipa/Fast-Datafree, zju-vipa/CMI: the name a checkout is known by in results.
REPOS = {"CSD": "luoshiya/CSD", "Fast-Datafree": "zju-vipa/Fast-Datafree", "CMI": "zju-vipa/CMI",
         "NAYER": "tmtuan1307/NAYER", "CPNet": "LannCX/CPNet", "AdaDFKD": "ljrprocc/DFKD",
         "SpaceshipNet": "skgyu/SpaceshipNet"}

# What every protocol shares. Student SGD as in all three datafree_kd.py (momentum 0.9 hard-coded,
# --wd default 1e-4, which none of the scripts used here overrides), cosine over the rounds to
# lr_min (CSD: 320 and CMI: 290 anneal to 0); KL with --T 20 as their scripts; a generator of
# nz 256, ngf 64 (datafree_kd.py builds Generator(nz=256, ngf=64, ...)).
_COMMON: dict[str, Any] = {
    "dataset": "fashion-mnist", "teacher": "wrn16_2", "student": "wrn16_1",
    "rounds": 15, "batch_size": 128, "synth_batch_size": 128,
    "lr": 0.1, "lr_min": 0.0, "momentum": 0.9, "weight_decay": 1e-4, "T": 20.0, "warmup": 0, "loss": "kl",
}
_GENERATOR = {"nz": 256, "ngf": 64}

# Fast-Datafree datafree_kd.py:324 anneals to eta_min 2e-4
_FAST = {**_COMMON, **_GENERATOR, "rounds": 5, "g_steps": 5, "kd_steps": 100, "lr_min": 2e-4,
         # Fast-Datafree scripts/fast_cifar.sh, WRN lines (Fast-5): lr_g 3e-3, lr_z 0.01, bn 10, oh 0.4, adv 1.1
         "lr_g": 3e-3, "lr_z": 0.01, "bn": 10.0, "oh": 0.4, "adv": 1.1, "bn_mmt": 0.9}

PROTOCOLS: dict[str, dict[str, Any]] = {
    # CSD scripts/csd/csd_cifar10_wrn402_wrn161.sh without the init bank; issue 8's round of 20
    # synthesis and 50 student steps, over 15 rounds instead of 30
    "csd": {**_COMMON, **_GENERATOR, "g_steps": 20, "kd_steps": 50, "loss": "csd",
            "lr_g": 1e-3, "lr_z": 1e-3, "bn": 1.0, "oh": 1.0, "adv": 0.0, "csd": 10.0, "fea": 30.0, "ce": 1.0},
    "fast": {**_FAST},
    "fast_meta": {**_FAST, "is_maml": 1},
    # CMI scripts/cmi/cmi_cifar10.sh (WRN-40-2 -> WRN-16-1), no init bank; bank sizes from CMI datafree_kd.py:276
    "cmi": {**_COMMON, **_GENERATOR, "rounds": 5, "g_steps": 20, "kd_steps": 50,
            "lr_g": 1e-3, "lr_z": 1e-3, "bn": 1.0, "oh": 1.0, "adv": 0.5, "cr": 0.8, "cr_T": 0.2,
            "bank_size": 40960, "n_neg": 4096, "head_dim": 256},
    # CMI scripts/deepinv/deepinv_cifar10_wrn402_wrn161.sh; tv 0.001 and l2 0 from CMI datafree_kd.py:252
    "deepinversion": {**_COMMON, "rounds": 5, "g_steps": 50, "kd_steps": 50,
                      "lr_g": 0.1, "bn": 10.0, "oh": 1.0, "adv": 1.0, "tv": 1e-3, "l2": 0.0},
    # NAYER scripts/nayer_100.sh (CIFAR-10 values: lr_g 4e-3, bn 10, oh 0.5, adv 1.33, g_loops 2) with
    # datafree_kd.py's defaults (bn_mmt 0.9, le_emb_size 1000, eta_min 2e-4, ngf 64 at NAYER datafree_kd.py:289);
    # g_steps 20 and g_life 3 instead of 30 and 10, so 5 rounds see a generator re-initialized (rounds 1 and 4);
    # no warm-up (its 10 loops per epoch would be most of the budget). One-hot label embeddings on both sides:
    # the repository ships CLIP embeddings for CIFAR's names only, and one-hot is our cpu preset's input.
    # CMI scripts/dfq/dfq_cifar10_wrn402_wrn161.sh (DFQ has no authors' code; the package is its reference):
    # 10 rounds per epoch of 1 generator step and 10 student steps on new samples, no augmentation, KL at
    # T 1 (datafree_kd.py:259 reassigns the criterion whatever --T says), cosine to 0 (l.290); 5 epochs of
    # the cpu preset's 200 student steps
    "dfq": {**_COMMON, "rounds": 5, "ep_steps": 200, "kd_steps": 10, "g_steps": 1, "nz": 256, "T": 1.0,
            "augment": False, "lr_g": 1e-3, "bn": 1.0, "oh": 1.0, "adv": 1.0, "balance": 20.0},
    "nayer": {**_COMMON, "rounds": 5, "g_steps": 20, "kd_steps": 100, "lr_min": 2e-4, "ngf": 64,
              "lr_g": 4e-3, "bn": 10.0, "oh": 0.5, "adv": 1.33, "bn_mmt": 0.9, "le_emb_size": 1000,
              "g_life": 3, "g_loops": 2, "gwp_loops": 10, "label_embeddings": "onehot"},
}
# CPNet cpnet_100.sh:43-46 (CIFAR-10 WRN-40-2 -> WRN-16-1) sets NAYER's values, and its datafree_kd.py keeps NAYER's
# defaults: the NAYER protocol as it is (its --dist is not a key: CoupledSynthesizer stores it and never reads it)
PROTOCOLS["cpnet"] = {k: v for k, v in PROTOCOLS["nayer"].items() if k != "ngf"}  # the teacher sets its widths
# AdaDFKD scripts/adadfkd/adadfkd_cifar10_resnet34_resnet18.sh (the README's example) but the budget, sized as dfq's
# (5 epochs of 20 rounds of 1 generator step + 10 student steps on new samples, no augmentation): l.11 g_steps 1,
# l.12 lr_g 1e-3, l.13-14 fractions 0.25/0.75, l.15 adv 1.0, l.16 grad_adv 0, l.18 T 20, l.19 lmda_ent -20, l.20 oh 1,
# l.21 act 0, l.24 bn 1, l.29 adv_type kl, l.30 curr_option curr_log, l.31 lambda_0 2.2, l.34 hard 0.1, l.35 length
# 0.9, l.36 tau 0.07 (one flag: the R2M queue's and the student InfoNCE's temperature), l.38 s_nce 0.1, l.39 --loss kl
# ("base": "loss" names our side's loss), l.41 N_neg 4096 (128 divides it, as their queue asserts, _utils.py:677;
# the script's own batch 768 does not). nz 512 is datafree_kd.py:559's CIFAR value; alpha 1e-4 is lambda's growth
# per student step datafree_kd.py:765-768 picks for cifar10 (2e-5 for any other dataset name). depth 2 (l.17) is
# the only generator our side builds. lr_min 0: CosineAnnealingLR(T_max=epochs) (datafree_kd.py:612).
PROTOCOLS["adadfkd"] = {
    **_COMMON, "rounds": 5, "ep_steps": 200, "kd_steps": 10, "g_steps": 1, "nz": 512, "augment": False,
    "loss": "adadfkd", "lr_g": 1e-3, "begin_fraction": 0.25, "end_fraction": 0.75, "adv": 1.0, "grad_adv": 0.0,
    "lmda_ent": -20.0, "oh": 1.0, "act": 0.0, "bn": 1.0, "adv_type": "kl", "curr_option": "curr_log",
    "lambda_0": 2.2, "alpha": 1e-4, "hard": 0.1, "length": 0.9, "tau": 0.07, "s_nce": 0.1, "base": "kl",
    "N_neg": 4096}
# SpaceshipNet (skgyu/SpaceshipNet) code/SpaceshipNet/scripts/DFKD_Cifar100_ResNet34_ResNet18_V37_conv012_seed40.yaml:
# l.40 lr_g 1e-3 (optimizer_G), l.44-45 student lr 0.1 and CosineAnnealingLR (no eta_min: networks/scheduler.py:474, so
# lr_min 0), l.57 oh = lambda_cls 0.5, l.58 bn = lambda_bn_meanvar 1, l.60 lambda_mSARC_cam_mse 1, l.61
# lambda_mSARC_gradcams_mse 1, l.70-71 gen_mixup_cutmix_p 0.7 (CFE on), l.75 conv_idx [0, 1, 2], l.89-90 distill.alpha 1
# and T 30, l.97 ngf 64, l.102 nz 256 (generator input_dim). Keys with no equivalent in the other protocols keep the
# config's names. Their one batch_size (l.50, 256) is both the synthesis and the student batch: 128 for both here.
# The budget as cmi's: 5 epochs of 20 synthesis steps and 50 student steps (the config: 200 and 2000).
PROTOCOLS["spaceshipnet"] = {
    **_COMMON, **_GENERATOR, "rounds": 5, "g_steps": 20, "kd_steps": 50, "loss": "spaceshipnet", "T": 30.0,
    "lr_g": 1e-3, "oh": 0.5, "bn": 1.0, "gen_mixup_cutmix_p": 0.7, "conv_idx": [0, 1, 2],
    "lambda_mSARC_cam_mse": 1.0, "lambda_mSARC_gradcams_mse": 1.0, "distill_alpha": 1.0}

# The long horizon: the rounds a method's persistent state needs before it can pay off, or not (each
# protocol as above, only longer; results go to their own --output, results/parity/long).
# - fast, fast_meta: the shared generator and the BN-statistics moving average carry over every round;
#   10 rounds, twice the short protocol, where the first report of a gap saw it open (rounds 5 -> 10).
# - cmi: the memory bank of earlier rounds' features feeds the contrastive term; at 20 steps a round
#   it holds 10 rounds of views after 10 rounds, far from its 40960 capacity but 10 times round 1's.
# - nayer: the generator lives g_life = 3 rounds between re-initializations; 10 rounds see three full
#   lives (re-initialized before rounds 1, 4, 7 and 10).
LONG_ROUNDS: dict[str, int] = {"fast": 10, "fast_meta": 10, "cmi": 10, "nayer": 10}

# The checkouts a method can run from: the first is the authors' own repository for that method.
REFERENCES: dict[str, tuple[str, ...]] = {
    "csd": ("CSD",),
    "fast": ("Fast-Datafree",),
    "fast_meta": ("Fast-Datafree",),
    "cmi": ("CMI", "Fast-Datafree", "CSD"),
    "deepinversion": ("CMI", "Fast-Datafree", "CSD"),
    "nayer": ("NAYER",),
    "cpnet": ("CPNet",),
    "adadfkd": ("AdaDFKD",),
    "spaceshipnet": ("SpaceshipNet",),  # its own trainer, not a datafree synthesizer (spaceship.py)
    "dfq": ("CMI",),  # Fast-Datafree's datafree_kd.py:270 builds it with student=teacher (no adversary)
}
# Online methods: a new generator batch for every student step, no pool; "rounds" are epochs of
# ep_steps // kd_steps (generator step, kd_steps student steps) cycles, evaluated once per epoch.
ONLINE = ("dfq", "adadfkd")

# Protocol key -> dfkd-bench run field (or method./loss. key); a tuple sets several keys to one value.
_OUR_KEYS: dict[str, str | tuple[str, ...]] = {
    "rounds": "epochs",
    "kd_steps": ("ep_steps", "kd_steps"),  # one round per epoch, unless the protocol sets ep_steps
    "ep_steps": "ep_steps", "augment": "kd_augment", "balance": "method.balance",
    "batch_size": "batch_size", "synth_batch_size": "synth_batch_size",
    "lr": "lr", "lr_min": "lr_min", "momentum": "momentum", "weight_decay": "weight_decay",
    "T": "temperature", "warmup": "warmup_epochs",
    "g_steps": "method.g_steps", "lr_g": "method.lr_g", "lr_z": "method.lr_z",
    "nz": "method.nz", "ngf": "method.ngf",
    "bn": "method.bn", "oh": "method.oh", "adv": "method.adv",
    "csd": "method.csd", "fea": "loss.fea", "ce": "loss.ce",
    "cr": "method.cr", "cr_T": "method.cr_T", "bank_size": "method.bank_size",
    "n_neg": "method.n_negatives", "head_dim": "method.head_dim",
    "bn_mmt": "method.bn_momentum", "tv": "method.tv", "l2": "method.l2",
    "le_emb_size": "method.le_emb_size", "g_life": "method.g_life", "g_loops": "method.g_loops",
    "gwp_loops": "method.gwp_loops", "label_embeddings": "method.label_embeddings",
    # AdaDFKD (methods/adadfkd.py): its one --tau is both the R2M queue's and the student InfoNCE's temperature
    "lmda_ent": "method.lmda_ent", "act": "method.act", "adv_type": "method.adv_type", "grad_adv": "method.grad_adv",
    "hard": "method.hard", "length": "method.length", "N_neg": "method.n_neg", "tau": ("method.tau", "loss.tau"),
    "begin_fraction": "method.begin_fraction", "end_fraction": "method.end_fraction",
    "base": "loss.base", "s_nce": "loss.s_nce", "curr_option": "loss.curr", "lambda_0": "loss.lambda_0",
    "alpha": "loss.alpha",
    # SpaceshipNet (methods/spaceshipnet.py, its Config and the spaceshipnet loss's): CFE's probability, the feature
    # levels student batches come from, the mSARC weights, and distill.alpha (the KL's weight)
    "gen_mixup_cutmix_p": "method.cfe_p", "conv_idx": "method.levels", "lambda_mSARC_cam_mse": "loss.cam",
    "lambda_mSARC_gradcams_mse": "loss.gradcam", "distill_alpha": "loss.kd",
}
# Protocol keys that become command-line options of `dfkd-bench run` instead of --set keys.
CLI_KEYS = ("dataset", "teacher", "student", "loss")
# Set on our side unless the protocol says otherwise ("augment"): the same per-sample crop + flip their
# loaders apply (the dataset's train transform).
_OUR_CONSTANTS = {"kd_augment": "true"}
# The preset our side starts from; every key it sets is overridden (tests/test_parity.py checks it).
OUR_PRESET = "quick"


def protocol(method: str, rounds: int | None = None, horizon: str = "short") -> dict[str, Any]:
    """A copy of ``method``'s protocol, at the ``long`` horizon (:data:`LONG_ROUNDS`) or with another
    number of rounds (smoke runs)."""
    if method not in PROTOCOLS:
        raise DfkdError(f"no parity protocol for '{method}'; choose from {', '.join(PROTOCOLS)}")
    out = dict(PROTOCOLS[method])
    if horizon == "long":
        if method not in LONG_ROUNDS:
            raise DfkdError(f"no long horizon for '{method}'; it has one for {', '.join(LONG_ROUNDS)}")
        out["rounds"] = LONG_ROUNDS[method]
    if rounds is not None:
        if rounds < 1:
            raise DfkdError(f"--rounds must be positive, got {rounds}")
        out["rounds"] = rounds
    return out


def protocol_sha(proto: dict[str, Any]) -> str:
    """A short fingerprint of a protocol, so runs of different protocols are never averaged together."""
    return hashlib.sha256(json.dumps(proto, sort_keys=True).encode()).hexdigest()[:12]


def _our_value(key: str, value: Any) -> str:
    if key == "is_maml":
        return "maml" if value else "reptile"
    if key == "curr_option":  # their curr_<type> (datafree_kd.py:799 splits it) is our loss.curr=<type>
        return str(value).split("_", 1)[1]
    return str(value).lower() if isinstance(value, bool) else str(value)


def ours_overrides(proto: dict[str, Any]) -> dict[str, str]:
    """The ``--set`` keys and values that express ``proto`` on dfkd-bench's runner."""
    out = dict(_OUR_CONSTANTS)
    for key, value in proto.items():
        if key in CLI_KEYS:
            continue
        if key == "is_maml":
            out["method.meta"] = _our_value(key, value)
            continue
        if key not in _OUR_KEYS:
            raise DfkdError(f"protocol key '{key}' has no dfkd-bench equivalent in benchmarks/parity/protocols.py")
        targets = _OUR_KEYS[key]
        if key == "kd_steps" and "ep_steps" in proto:  # several rounds per epoch
            targets = "kd_steps"
        for target in (targets,) if isinstance(targets, str) else targets:
            out[target] = _our_value(key, value)
    return out


def ours_command(method: str, proto: dict[str, Any], seed: int, output: str, name: str,
                 teacher_store: str, extra_sets: dict[str, str] | None = None) -> list[str]:
    """The ``dfkd-bench run`` arguments (after the program name) for one run of our side."""
    args = ["run", "--method", method, "--preset", OUR_PRESET, "--seed", str(seed),
            "--dataset", proto["dataset"], "--teacher", proto["teacher"], "--student", proto["student"],
            "--loss", proto["loss"], "--device", "cpu", "--teacher-store", teacher_store,
            "--output", output, "--name", name]
    for key, value in {**ours_overrides(proto), **(extra_sets or {})}.items():
        args += ["--set", f"{key}={value}"]
    return args
