"""SpaceshipNet's side of the parity harness: the authors' own trainer, imported from a checkout at run time.

skgyu/SpaceshipNet is not the datafree-package layout of the other references: its code (under
``code/SpaceshipNet`` of the repository) is a trainer class assembled from function files, an options object
read from a YAML config, a networks registry and an LMDB feature pool. So instead of building a synthesizer,
:func:`run_spaceship_reference` builds their trainer with ``models.models.create_model(opt)``, exactly as their
driver does, and runs the driver's epoch loop. Lines are cited as

- ``V37``: ``models/model_CFE_mSARC_bases/model_CFE_mSARC_base_V37.py`` (the functions every config loads),
- ``base``: ``models/model_CFE_mSARC_base.py``, ``BaseModel``: ``models/base_model.py``,
- ``driver``: ``train/train_cvpr2023.py``,
- ``C100``: ``scripts/DFKD_Cifar100_ResNet34_ResNet18_V37_conv012_seed40.yaml``,

all under ``code/SpaceshipNet``. Their top-level packages (``networks``, ``models``, ``datafree``, ``data``,
``options``, ``skyu_tools``) clash with other repositories' ``datafree`` and their base class copies a file by a
relative path (base:54): the run happens in the reference subprocess (``python -m benchmarks.parity.reference``,
one process per run), with its working directory set to ``code/SpaceshipNet`` for the duration of the run.

The shims (each named in the result's ``shims``; README.md lists them with reasons): the zoo networks behind
their ``networks.find_network`` (:class:`SpaceshipClassifier`), ``.cuda()`` kept on the CPU, stub modules for
imports only their LMDB pool and image dumps use, a one-channel normalizer, an in-memory feature pool
(:class:`InMemoryFeaturePool`) in place of the LMDB one, and their debugging image dumps turned off.
"""

from __future__ import annotations

import contextlib
import copy
import importlib
import importlib.util
import logging
import os
import pickle
import shutil
import sys
import time
import types
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import yaml

from dfkd_bench.data import Normalizer, evaluate, get_dataset
from dfkd_bench.errors import DfkdError
from dfkd_bench.runtime import seed_everything
from dfkd_bench.teachers import load_teacher
from dfkd_bench.zoo import create_model

from . import shims
from .protocols import REPOS
from .reference import checkout_identity as reference_identity
from .reference import result_record, round_record

DEVICE = "cpu"
REPO = "SpaceshipNet"
# The config whose values the run starts from (the protocol then sets its own; protocols.py cites the lines).
CONFIG = "scripts/DFKD_Cifar100_ResNet34_ResNet18_V37_conv012_seed40.yaml"
# Their model and the function file every shipped config loads onto it (C100:5-6).
MODEL, MODEL_FILES = "model_CFE_mSARC_base", ["model_CFE_mSARC_base_V37"]
# The name the in-memory pool is registered under in datafree.utils._utils, where V37:217-231 looks it up.
POOL_TYPE = "ParityInMemoryFeaturePool"
# Their top-level packages: forgotten after the run so nothing of theirs outlives it in this process.
THEIR_PACKAGES = ("networks", "models", "datafree", "data", "options", "skyu_tools", "setting", "train")
# Modules their imports need that the venv may lack, and what stands in: lmdb, pyarrow and pickle5 serve only their
# LMDB pool (datafree/utils/_utils.py:8-12, data/lmdbDataset.py:12-15), which the in-memory pool replaces; cv2 is
# imported by skyu_tools/skyu_util.py:8 and data/lmdbDataset.py:6 and never called on this path; imp (removed in
# Python 3.12) is imported and unused by base:9 and models/test_functions.py:9.
_STUBS: dict[str, Callable[[], types.ModuleType]] = {
    "cv2": lambda: types.ModuleType("cv2"),
    "lmdb": lambda: types.ModuleType("lmdb"),
    "pyarrow": lambda: types.ModuleType("pyarrow"),
    "pickle5": lambda: pickle,  # pickle5 backported protocol 5, which pickle has had since Python 3.8
    "imp": lambda: types.ModuleType("imp"),
}


def code_dir(checkout: Path) -> Path:
    """Where their code lives in a checkout of the repository root."""
    return Path(checkout) / shims.SPACESHIP_CODE


def _sources(checkout: Path) -> list[Path]:
    """The sources and configs under ``code/SpaceshipNet``: what the identity's sha256 covers."""
    return [p for p in code_dir(checkout).rglob("*") if p.suffix in (".py", ".yaml") and p.is_file()]


def checkout_identity(checkout: Path) -> dict[str, Any]:
    """:func:`reference.checkout_identity` over ``code/SpaceshipNet``'s sources and configs; refuses any other
    repository."""
    identity = reference_identity(checkout, _sources)
    if identity["repo"] != REPO:
        raise DfkdError(f"method 'spaceshipnet' runs from a checkout of {REPOS[REPO]}, not {REPOS[identity['repo']]}")
    return identity


def check_supported(proto: dict[str, Any]) -> None:
    """Refuse a protocol their trainer cannot express (it would silently run something else)."""
    if proto["loss"] != "spaceshipnet":
        raise DfkdError(f"their trainer has its own student loss (V37:770-836) only, not '{proto['loss']}'")
    if proto["synth_batch_size"] != proto["batch_size"]:
        raise DfkdError("their one batch_size (C100:50) is both the synthesis and the student batch: "
                        f"synth_batch_size {proto['synth_batch_size']} must equal batch_size {proto['batch_size']}")
    if proto["warmup"]:
        raise DfkdError("their driver has no warm-up (train/train_cvpr2023.py:288-320); set warmup 0")
    if proto["momentum"] != 0.9:
        raise DfkdError("their student SGD hard-codes momentum 0.9 (model_CFE_mSARC_base.py:98)")
    if proto["lr_min"] != 0:
        raise DfkdError("their CosineAnnealingLR has no eta_min (networks/scheduler.py:474): lr_min must be 0")
    if not proto.get("augment", True):
        raise DfkdError("their crop + flip is always on (V37:509, 751): augment must be true")
    if proto.get("ep_steps", proto["kd_steps"]) != proto["kd_steps"]:
        raise DfkdError("their epoch is one synthesis round and kd_steps student steps (V37:850-867): "
                        "ep_steps must equal kd_steps")


# ---------------------------------------------------------------- their options object


def _wrap(value: Any) -> Any:
    if isinstance(value, dict) and not isinstance(value, Options):
        return Options(value)
    if isinstance(value, list):
        return [_wrap(v) for v in value]
    return value


class Options(dict):
    """Their options object (an EasyDict, options/base_options.py:40) without easydict: every key reads as
    ``opt.x`` and ``opt['x']``, nested mappings too (``opt.distill.T``, ``opt['optimizer_S']['lr']``,
    ``'alpha_2' in opt.distill``), and a missing key raises AttributeError, so ``hasattr(opt, 'model_files')``
    (base:51) works."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__()
        self.update(*args, **kwargs)

    def update(self, *args: Any, **kwargs: Any) -> None:
        for key, value in dict(*args, **kwargs).items():
            self[key] = value

    def __setitem__(self, key: str, value: Any) -> None:
        super().__setitem__(key, _wrap(value))

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def __setattr__(self, name: str, value: Any) -> None:
        self[name] = value

    def __delattr__(self, name: str) -> None:
        try:
            del self[name]
        except KeyError:
            raise AttributeError(name) from None


def _three(values: tuple[float, ...]) -> list[float]:
    """A per-channel list as their constructor needs it (``.view(1, 3, 1, 1)``, base:44-45, 178-179, V37:165-166)."""
    values = [float(v) for v in values]
    return values * 3 if len(values) == 1 else values


def build_options(code: Path, proto: dict[str, Any], spec, seed: int, work: Path, teacher_arc: str,
                  student_arc: str) -> Options:
    """Their ``opt`` as ``TrainOptions().parse()`` would give it for the C100 config (read from the checkout), with
    the protocol's values, our data and networks, the CPU, and the folders of this run. Built directly: their parse
    reads sys.argv and calls ``torch.cuda.set_device`` (options/base_options.py:39, 66)."""
    opt = Options(yaml.safe_load((code / CONFIG).read_text()))
    p = proto
    for sub in ("debug_image_dir", "debug_info_dir", "grad_info_dir"):
        (work / sub).mkdir(parents=True, exist_ok=True)
    opt.update({
        # what parse() adds (options/base_options.py:26-203, train_options.py:18-228): the flags' defaults and
        # the derived folders; gpu_ids empty and the CPU device (parse() would pick cuda:0)
        "name": f"parity_spaceshipnet_s{seed}", "isTrain": True, "continue_train": False, "local_rank": 0,
        "gpu_ids": [], "device": torch.device(DEVICE), "expr_dir": str(work),
        "debug_image_dir": str(work / "debug_image_dir"), "debug_info_dir": str(work / "debug_info_dir"),
        "grad_info_dir": str(work / "grad_info_dir"), "aug_padding": 4, "synthesize_interval": 1,
        "weight_decay": p["weight_decay"], "FeatureLabelImagePoolType": POOL_TYPE, "manualSeed": seed,
        # the loaders of their pools run in this process (C100:51 says 4 workers)
        "num_workers": 0,
        # C100:5-6 already; kept explicit: the trainer this harness drives
        "model": MODEL, "model_files": list(MODEL_FILES),
        # the protocol (protocols.py cites C100's lines for each)
        "start_epoch": 0, "max_epoch": p["rounds"] - 1,  # epochs counted from 0 (C100:27-28); T_max = max_epoch + 1
        "g_steps": p["g_steps"], "kd_steps": p["kd_steps"], "batch_size": p["batch_size"],
        "lambda_cls": p["oh"], "lambda_bn_meanvar": p["bn"],
        "lambda_mSARC_cam_mse": p["lambda_mSARC_cam_mse"], "lambda_mSARC_gradcams_mse": p["lambda_mSARC_gradcams_mse"],
        "gen_mixup_cutmix_p": p["gen_mixup_cutmix_p"], "conv_idx": list(p["conv_idx"]),
        "distill": {"alpha": p["distill_alpha"], "T": p["T"]},
        "input_dim": p["nz"],  # generate_input's noise width (C100:121, base:256)
        # the 3-channel views their constructor takes; a 1-channel dataset's values are repeated, then replaced
        # (see adapt_trainer)
        "train_normalize": [_three(spec.mean), _three(spec.std)],
        "prin_normalize": [_three(spec.mean), _three(spec.std)],
        # their generator, built by their find_network; the teacher and student: the zoo's (find_network patched)
        "generator": {**opt["generator"], "ngf": p["ngf"], "img_size": spec.image_size, "nc": spec.channels,
                      "input_dim": p["nz"], "pretrained_loc": None},
        # init None: V37:119-120 then keeps the zoo's initialization (the same initial student as our side)
        "student_net": {"arc": student_arc, "init": None, "num_classes": spec.num_classes},
        "teacher_net": {"arc": teacher_arc, "nchannel_input": spec.channels, "num_classes": spec.num_classes},
    })
    opt["optimizer_G"]["lr"] = [p["lr_g"]]
    opt["optimizer_S"]["lr"] = [p["lr"]]
    return opt


# ---------------------------------------------------------------- shims


class SpaceshipClassifier(nn.Module):
    """Shim: a dfkd-bench zoo Wide ResNet behind the interface their trainer calls, as their own WRN wrapper
    (networks/wresnet_1028_R2.py:17-88, which cannot be imported: its base networks/wresnet.py is not in the
    repository) has it.

    ``forward(x)`` returns ``(logits, pooled, last_map, [stage outputs])``: the pooled features, the last map after
    the final BN-ReLU (their ``cam_feature``, which the CAM term multiplies by the classifier's weight), and the
    outputs of the three block groups. With ``do_save_gradient()`` on, the forward registers a hook on each stage
    output that appends its gradient to ``gradients`` (deepest first, as a backward pass reaches them), which their
    Grad-CAM reads reversed (V37:29-43); ``do_save_gradient(False)`` clears it. ``linear_attr`` names the classifier
    and ``linear_input_dim`` its width (V37:48, 171-183). Both sides train the very same network object."""

    linear_attr = "fc"

    def __init__(self, model: nn.Module):
        super().__init__()
        missing = [a for a in ("conv1", "block1", "block2", "block3", "bn_final", "fc") if not hasattr(model, a)]
        if missing:
            raise DfkdError(f"the parity harness needs a zoo Wide ResNet (wrn*), got {type(model).__name__}")
        self.model = model
        self.linear_input_dim = model.fc.in_features
        self.bool_save_gradient = False
        self.gradients: list[torch.Tensor] = []

    @property
    def fc(self) -> nn.Module:
        return self.model.fc

    def do_save_gradient(self, bool_save_gradient: bool = True) -> None:
        self.bool_save_gradient = bool_save_gradient
        if not bool_save_gradient:
            self.gradients = []

    def save_gradient(self, grad: torch.Tensor) -> None:
        self.gradients.append(grad)

    def get_gradient(self) -> list[torch.Tensor]:
        return self.gradients

    def forward(self, x: torch.Tensor):
        if self.bool_save_gradient:
            self.gradients = []
        m = self.model
        h = m.conv1(x)
        stages = []
        for group in (m.block1, m.block2, m.block3):
            h = group(h)
            if self.bool_save_gradient:
                h.register_hook(self.save_gradient)
            stages.append(h)
        last_map = F.relu(m.bn_final(h))
        pooled = m.forward_head(last_map, pre_logits=True)
        return m.fc(pooled), pooled, last_map, stages


class _PoolDataset(torch.utils.data.Dataset):
    """A snapshot of the pool's samples, items as their ``LMDBFeatureLabelImageDataset`` gives them
    (data/lmdbDataset.py:65-85): the feature map and the image as float tensors, the label as stored."""

    def __init__(self, samples: list[tuple[np.ndarray, Any, np.ndarray]]):
        self.samples = samples

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, idx: int) -> dict[str, Any]:
        feature, label, image = self.samples[idx % len(self.samples)]
        return {"feature": torch.tensor(feature), "label": copy.deepcopy(label), "image": torch.tensor(image)}


class InMemoryFeaturePool:
    """Shim: their feature pool's interface (``SkyuFeatureLabelImagePool``, datafree/utils/_utils.py:164-231:
    ``add(features, labels, images)`` appends a round's samples in order, ``get_dataset()`` gives every sample
    so far) in memory instead of LMDB, so lmdb, pyarrow and pickle5 are not needed. What a sample holds and the
    order of the samples are theirs (their LMDB entries are pickles of the same arrays). Unlike their pool, it
    never reopens an earlier run's folder with its entries (_utils.py:173-188), and unlike their in-memory
    ``SkyuFeatureLabelImagePool1024`` it keeps every round (that one's ``[[None] * b] * n`` lists hold only the
    latest, datafree/utils/_utils_skyu.py:272-274)."""

    def __init__(self, root: str, name: str = "feature_label_images.lmdb"):
        self.name = name
        self.samples: list[tuple[np.ndarray, Any, np.ndarray]] = []

    def add(self, features: np.ndarray, labels: np.ndarray, images: np.ndarray, targets: Any = None) -> None:
        for feature, label, image in zip(features, labels, images):
            self.samples.append((np.array(feature, copy=True), copy.deepcopy(label), np.array(image, copy=True)))

    def get_dataset(self) -> _PoolDataset:
        return _PoolDataset(list(self.samples))


class _FirstOutput(nn.Module):
    """Their evaluation reads the logits, the first of the network's outputs (test_functions.py:157-170)."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)[0]


def _no_dump(*args: Any, **kwargs: Any) -> None:
    """Their debugging image dumps (record_batchimg, record_feature_fuse) write files only."""


@contextlib.contextmanager
def installed(code: Path, networks_by_arc: dict[str, nn.Module]) -> Iterator[tuple[list[str], Callable]]:
    """Their code importable from ``code`` (first on sys.path, the working directory), the shims in place; yields
    the names of those that applied and their ``models.models.create_model``. On exit the working directory,
    sys.path and every patch are restored and their modules are forgotten."""
    code = Path(code).resolve()
    patches = shims._Patches()
    added: list[str] = []
    saved_path, saved_cwd, before = list(sys.path), os.getcwd(), set(sys.modules)
    try:
        # pandas (imported by base:10 and test_functions.py:10) probes pyarrow at import: it must meet the real
        # module or none, not the stub
        importlib.import_module("pandas")
        for name, stub in _STUBS.items():
            if importlib.util.find_spec(name) is None:  # looked up, not imported (imp warns when imported)
                sys.modules[name] = stub()
                added.append(name)
                patches.applied.append(name)
        # unconditional .cuda() (base:44-45, 178-179, 256-260; V37:165-166, 624-625): the protocol runs on the CPU
        patches.set(torch.Tensor, "cuda", lambda self, *args, **kwargs: self, "cuda-noop")
        patches.set(nn.Module, "cuda", lambda self, *args, **kwargs: self, "cuda-noop")
        os.chdir(code)  # base:54 copies models/model_CFE_mSARC_bases/<file>.py by a relative path
        sys.path.insert(0, str(code))
        networks = importlib.import_module("networks")
        original = networks.find_network

        def find_network(network_args):  # V37:105-110 look it up at call time
            arc = network_args["arc"]
            return networks_by_arc[arc] if arc in networks_by_arc else original(network_args)

        patches.set(networks, "find_network", find_network, "find-network-zoo")
        pool_module = importlib.import_module("datafree.utils._utils")
        setattr(pool_module, POOL_TYPE, InMemoryFeaturePool)  # V37:217-224 find it there by name
        patches.applied.append("feature-pool-in-memory")
        yield patches.applied, importlib.import_module("models.models").create_model
    finally:
        patches.undo()
        os.chdir(saved_cwd)
        sys.path[:] = saved_path
        for name in set(sys.modules) - before:
            if name.split(".")[0] in THEIR_PACKAGES or name in added:
                del sys.modules[name]


def adapt_trainer(trainer: Any, spec, applied: list[str]) -> None:
    """The shims that act on the built trainer."""
    if spec.channels != 3:
        # base:44-45, 178-179 and V37:165-166 view the mean and std as (1, 3, 1, 1): a 1-channel batch would broadcast
        # to three channels. The same values, one per channel of the dataset.
        mean = torch.tensor(spec.mean, dtype=torch.float32).view(1, -1, 1, 1)
        std = torch.tensor(spec.std, dtype=torch.float32).view(1, -1, 1, 1)
        trainer.sub_num, trainer.div_num = mean.clone(), std.clone()
        trainer.prin_sub_num, trainer.prin_div_num = mean.clone(), std.clone()
        applied.append("normalize-channels")
    # V37:729-742 dump images the first time CFE fires in an epoch: make_grid(..., range=None) (V37:305, 314,
    # test_functions.py:74), an argument torchvision dropped, so the first such step raises TypeError. Files only.
    trainer.record_batchimg = _no_dump
    trainer.record_feature_fuse = _no_dump
    applied.append("debug-dumps-off")


def _timed(trainer: Any, name: str, clock: dict[str, float], phase: str) -> None:
    """Time ``trainer.<name>`` (wall and CPU seconds into ``clock``) as their optimize_step calls it."""
    fn = getattr(trainer, name)

    def timed(*args: Any, **kwargs: Any) -> Any:
        t0, c0 = time.time(), time.process_time()
        try:
            return fn(*args, **kwargs)
        finally:
            clock[phase] += time.time() - t0
            clock[phase + "_cpu"] += time.process_time() - c0

    setattr(trainer, name, timed)


def _close_log_files(work: Path) -> None:
    """Their loggers (skyu_util.get_logger) hold files in the run's folder: close them."""
    for logger in [logging.getLogger(n) for n in list(logging.Logger.manager.loggerDict)]:
        for handler in list(getattr(logger, "handlers", [])):
            if isinstance(handler, logging.FileHandler) and Path(handler.baseFilename).is_relative_to(work):
                handler.close()
                logger.removeHandler(handler)


def run_spaceship_reference(job: dict[str, Any], echo: Callable[[str], None] = print) -> dict[str, Any]:
    """Run ``job`` (method spaceshipnet, protocol, seed, checkout, work_dir, teacher_store) through their trainer
    and return the result record of :func:`benchmarks.parity.reference.run_reference`."""
    p, seed = job["protocol"], int(job["seed"])
    checkout = Path(job["checkout"]).resolve()
    identity = checkout_identity(checkout)
    check_supported(p)
    work = Path(job["work_dir"]).resolve() / "spaceshipnet"
    shutil.rmtree(work, ignore_errors=True)
    started = time.time()
    spec = get_dataset(p["dataset"])
    test_x, test_y = spec.load("test")  # before their working directory: the data root may be relative
    # Their parse(): random, numpy and torch seeded (options/base_options.py:198-203). Teacher before student, as
    # dfkd-bench's Runner builds them, so a seed gives the same initial student on both sides; their find_network
    # then hands these out, and builds their generator (V37:105-110).
    seed_everything(seed)
    teacher, teacher_meta = load_teacher(spec, p["teacher"], Path(job["teacher_store"]))
    student = create_model(p["student"], spec.num_classes, spec.channels, spec.image_size)
    # their teacher is never frozen: their Grad-CAM differentiates its logits w.r.t. its parameters (V37:32)
    teacher.requires_grad_(True)
    teacher_arc, student_arc = f"zoo-teacher:{p['teacher']}", f"zoo-student:{p['student']}"
    nets = {teacher_arc: SpaceshipClassifier(teacher).to(DEVICE).eval(),
            student_arc: SpaceshipClassifier(student).to(DEVICE)}
    code = code_dir(checkout)
    eval_norm = Normalizer(spec.mean, spec.std)
    rounds = []
    try:
        with installed(code, nets) as (applied, create_trainer):
            opt = build_options(code, p, spec, seed, work, teacher_arc, student_arc)
            trainer = create_trainer(opt)  # driver:241
            adapt_trainer(trainer, spec, applied)
            clock = {"synth": 0.0, "synth_cpu": 0.0, "distill": 0.0, "distill_cpu": 0.0}
            _timed(trainer, "train_G", clock, "synth")  # what optimize_step calls (V37:861-867)
            _timed(trainer, "train_S", clock, "distill")
            logits = _FirstOutput(trainer.student_net)
            # driver:288-320 (the sample dumps, loss plots, checkpoints and per-class accuracy files left out)
            for epoch in range(p["rounds"]):
                lr = trainer.optimizer_S.param_groups[0]["lr"]
                for key in clock:
                    clock[key] = 0.0
                trainer.iepoch = epoch
                trainer.trainstate()
                trainer.clear_loss()
                trainer.optimize_step()  # train_G (one synthesis round), then train_S (kd_steps student steps)
                trainer.evalstate()
                t2 = time.time()
                acc = evaluate(logits, test_x, test_y, eval_norm, torch.device(DEVICE))  # driver:314
                t3 = time.time()
                trainer.update_learning_rate(epoch + 1)  # driver:320: the cosine schedule, stepped per epoch
                wall = {"synth": clock["synth"], "distill": clock["distill"]}
                cpu = {"synth": clock["synth_cpu"], "distill": clock["distill_cpu"]}
                rounds.append(round_record(epoch + 1, p["rounds"], acc, lr, wall, cpu, t3 - t2, echo))
    finally:
        _close_log_files(work)
    shutil.rmtree(work, ignore_errors=True)
    return result_record(identity, applied, rounds, teacher_meta, started, pyyaml=yaml.__version__)
