"""Teacher store: train a teacher once, keep it with a sidecar that says how, find it later.

Layout: ``<store>/<dataset>/<arch>.pt`` (the state dict) and ``<arch>.json`` (arch, dataset,
test accuracy, sha256, training settings, versions). The store is ``$DFKD_BENCH_TEACHERS``
or ``./teachers``.
"""

from __future__ import annotations

import json
import math
import os
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from .augment import crop_flip
from .data import DatasetSpec, ImageSplit, Normalizer, evaluate, to_unit
from .errors import DfkdError
from .runtime import (
    atomic_torch_save,
    atomic_write_json,
    device_name,
    read_json_object,
    rng_state,
    safe_load,
    seed_everything,
    select_device,
    set_rng_state,
    sha256_file,
    versions,
)
from .zoo import EXPLICIT_TIMM_PREFIX, check_model_input, create_model, resolve_model_name


def default_store() -> Path:
    return Path(os.environ.get("DFKD_BENCH_TEACHERS", "teachers"))


@dataclass
class TeacherTrainConfig:
    """How a teacher is trained; :func:`default_train_config` holds the per-dataset recipes."""

    epochs: int = 4
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: str = "onecycle"  # onecycle: per step, warm-up then cosine; multistep: lr / 10 at `milestones`
    milestones: tuple[float, ...] = ()  # fractions of `epochs` after which multistep divides the lr by 10
    seed: int = 0
    augment: bool = True
    limit: int = 0  # train on the first N training images only (smoke tests); 0 = all
    half: bool = False  # store float16 weights (half the file; loading upcasts to float32)


SCHEDULES = ("onecycle", "multistep")

# The authors' train_scratch.py (CMI, Fast, CSD): 200 epochs, batch 256, SGD lr 0.1 divided by 10
# after epochs 120, 150 and 180, weight decay 1e-4, random crop (pad 4) + flip. The milestones are
# kept as fractions so that a shorter --epochs still decays (200 epochs: exactly 120, 150, 180).
_AUTHORS_CIFAR = {"epochs": 200, "batch_size": 256, "lr": 0.1, "weight_decay": 1e-4, "schedule": "multistep",
                  "milestones": (0.6, 0.75, 0.9)}

# Per-dataset recipes of `teacher train` (and of the teachers `run` trains when one is missing).
# Fashion-MNIST has no published DFKD teacher recipe: the class defaults, a 4-epoch one-cycle
# schedule, are this project's CPU recipe (WRN-16-2: 92.05%, ResNet-34: see README).
TRAIN_DEFAULTS: dict[str, dict[str, Any]] = {
    "fashion-mnist": {},
    "cifar10": _AUTHORS_CIFAR,
    "cifar100": _AUTHORS_CIFAR,
    # torchvision's reference ResNet recipe (references/classification/README.md): 90 epochs, batch 256,
    # SGD lr 0.1 divided by 10 every 30 epochs, weight decay 1e-4; random resized crop + flip
    "imagenet": {"epochs": 90, "batch_size": 256, "lr": 0.1, "weight_decay": 1e-4, "schedule": "multistep",
                 "milestones": (1 / 3, 2 / 3)},
}


def milestone_epochs(cfg: TeacherTrainConfig) -> list[int]:
    """The epochs after which the multistep schedule divides the learning rate by 10."""
    return [round(f * cfg.epochs) for f in cfg.milestones]


def default_train_config(dataset: str, **overrides: Any) -> TeacherTrainConfig:
    """The recipe for ``dataset`` with the non-``None`` ``overrides`` applied."""
    values = {**TRAIN_DEFAULTS.get(dataset, {}), **{k: v for k, v in overrides.items() if v is not None}}
    cfg = TeacherTrainConfig(**values)
    if cfg.schedule not in SCHEDULES:
        raise DfkdError(f"unknown teacher schedule '{cfg.schedule}' (valid: {', '.join(SCHEDULES)})")
    return cfg


def teacher_paths(store: Path, dataset: str, arch: str) -> tuple[Path, Path]:
    folder = Path(store) / dataset
    return folder / f"{arch}.pt", folder / f"{arch}.json"


def partial_path(store: Path, dataset: str, arch: str) -> Path:
    """Where an unfinished training keeps its last epoch's state (removed when it completes)."""
    return Path(store) / dataset / f"{arch}.partial.pt"


VARIANT = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


def split_teacher(name: str) -> tuple[str, str | None]:
    """``wrn16_2@s1`` -> ``("wrn16_2", "s1")``; ``wrn16_2`` -> ``("wrn16_2", None)``. A variant tells apart
    teachers of one (dataset, architecture): ``s<N>`` is the one ``teacher train --seed N`` stores.

    Raises:
        DfkdError: a variant that is empty or holds other characters than letters, digits, ``_ . -``.
    """
    arch, sep, variant = name.partition("@")
    if sep and not VARIANT.fullmatch(variant):
        raise DfkdError(f"teacher '{name}': a variant after '@' is letters, digits, '_', '.' or '-' (e.g. wrn16_2@s1)")
    return arch, (variant if sep else None)


def stored_name(name: str, image_size: int) -> str:
    """The store's file stem of teacher ``name``: the zoo's resolved architecture, then ``@variant`` if any."""
    arch, variant = split_teacher(name)
    resolved = resolve_model_name(arch, image_size)
    return f"{resolved}@{variant}" if variant else resolved


def variant_seed(name: str) -> int | None:
    """The training seed a ``s<N>`` variant names (0 for a plain name), else None."""
    _, variant = split_teacher(name)
    if variant is None:
        return 0
    return int(variant[1:]) if re.fullmatch(r"s[0-9]+", variant) else None


def find_teacher(spec: DatasetSpec, arch: str, store: Path | None = None) -> Path | None:
    """The stored checkpoint for (dataset, teacher name), or ``None`` when there is none."""
    ckpt, _ = teacher_paths(Path(store) if store else default_store(), spec.name, stored_name(arch, spec.image_size))
    return ckpt if ckpt.is_file() else None


def train_command(dataset: str, arch: str, cfg: TeacherTrainConfig | None = None) -> str:
    """The ``teacher train`` command line; with ``cfg``, every option that departs from the recipe."""
    base, variant = split_teacher(arch)
    seed = variant_seed(arch)
    cmd = f"dfkd-bench teacher train --dataset {dataset} --arch {base}"
    if variant is not None and seed is None:
        cmd += f" --variant {variant}"
    if cfg is None:
        return cmd + (f" --seed {seed}" if seed else "")
    recipe = default_train_config(dataset)
    cmd += f" --epochs {cfg.epochs} --seed {cfg.seed}"
    for field, flag in (("batch_size", "--batch-size"), ("lr", "--lr"), ("limit", "--limit")):
        if getattr(cfg, field) != getattr(recipe, field):
            cmd += f" {flag} {getattr(cfg, field)}"
    return cmd + (" --half" if cfg.half else "")


class TrainProgress:
    """What teacher training reports; subclass and override what you show. Every method is optional."""

    def start(self, start_epoch: int, done_steps: int, total_steps: int) -> None:
        """Called once before the first step; ``start_epoch > 0`` when an interrupted training resumes."""

    def estimate(self, seconds: float, timed_steps: int) -> None:
        """Called once, after a few timed steps: the seconds the rest of the training should take."""

    def step(self, done: int, total: int, epoch: int, loss: float) -> None:
        """Called after every optimizer step."""

    def epoch(self, epoch: int, accuracy: float) -> None:
        """Called after each epoch's test-set evaluation (after its checkpoint is written)."""


TIMED_STEPS = 3  # steps timed for the estimate, after one untimed warm-up step


def refuse_replacing(ckpt: Path, force: bool) -> None:
    """Refuse to overwrite a stored teacher unless ``force``: runs name their teacher by its sha256, and a
    run resuming on a replaced teacher is refused, but a silent swap would still surprise its owner."""
    if ckpt.is_file() and not force:
        side = ckpt.with_suffix(".json")
        try:
            meta = json.loads(side.read_text()) if side.is_file() else {}
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            meta = {}
        sha = meta.get("sha256") if isinstance(meta, dict) else None
        held = f"sha256 {sha[:12]}" if isinstance(sha, str) else "a teacher"
        raise DfkdError(f"{ckpt} already holds {held}; pass --force to replace it (finished runs keep its sha256 "
                        "in their summaries; an unfinished run will refuse to resume on the new one)")


def train_teacher(spec: DatasetSpec, arch: str, cfg: TeacherTrainConfig, store: Path, device: str = "auto",
                  progress: TrainProgress | None = None, force: bool = False) -> dict[str, Any]:
    """Train ``arch`` on the real train split, evaluate on the test split, store it. Returns the sidecar.

    After every epoch but the last, the whole training state goes to :func:`partial_path`; calling
    this again with the same settings resumes from there and ends with the same weights. A teacher
    already stored for (dataset, arch) is replaced only with ``force`` (else :class:`DfkdError`).
    """
    progress = progress or TrainProgress()
    dev = select_device(device)
    seed_everything(cfg.seed)
    base, variant = split_teacher(arch)
    resolved, name = resolve_model_name(base, spec.image_size), stored_name(arch, spec.image_size)
    ckpt, side = teacher_paths(store, spec.name, name)
    refuse_replacing(ckpt, force)
    partial = partial_path(store, spec.name, name)
    model = create_model(base, spec.num_classes, spec.channels, spec.image_size).to(dev)
    if spec.lazy:  # class folders (ImageNet): decoded and augmented by DataLoader workers as they are read
        train_split = spec.split("train", train=cfg.augment)
        n_train = min(len(train_split), cfg.limit or len(train_split))
        aug = nn.Identity()
    else:
        train_x, train_y = spec.load("train")
        if cfg.limit:
            train_x, train_y = train_x[:cfg.limit], train_y[:cfg.limit]
        n_train = len(train_x)
        aug = crop_flip(spec.image_size).to(dev) if cfg.augment else nn.Identity()
    test = spec.split("test")
    norm = Normalizer(spec.mean, spec.std).to(dev)  # what the sidecar records as the teacher's normalization
    steps_per_epoch = max(1, n_train // cfg.batch_size)
    total_steps = cfg.epochs * steps_per_epoch
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    if cfg.schedule == "onecycle":
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=total_steps, pct_start=0.15)
    else:
        sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=milestone_epochs(cfg), gamma=0.1)
    gen = torch.Generator().manual_seed(cfg.seed)
    # float16 autocast on CUDA, so the loss is scaled: unscaled float16 gradients underflow (off on CPU)
    scaler = torch.amp.GradScaler(dev.type, enabled=dev.type == "cuda")
    start_epoch, history, seconds_before = 0, [], 0.0
    state = _read_partial(partial, cfg, spec.name, arch)
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        if state.get("scaler"):  # absent from partial files written before the scaler, and on CPU
            scaler.load_state_dict(state["scaler"])
        gen.set_state(state["generator"])
        set_rng_state(state["rng"])
        start_epoch, history, seconds_before = state["epoch"], list(state["history"]), state["seconds"]
    started = time.time()
    progress.start(start_epoch, start_epoch * steps_per_epoch, total_steps)
    step_times: list[float] = []
    acc = 0.0
    for epoch in range(start_epoch, cfg.epochs):
        model.train()
        if spec.lazy:
            reader = train_split.batches(cfg.batch_size, generator=gen)
        else:
            order = torch.randperm(len(train_x), generator=gen)
        for step in range(steps_per_epoch):
            tick = time.perf_counter()
            if spec.lazy:
                images, labels = next(reader)
            else:
                idx = order[step * cfg.batch_size:(step + 1) * cfg.batch_size]
                images, labels = train_x[idx], train_y[idx]
            x = norm(aug(to_unit(images.to(dev))))
            with torch.autocast(dev.type, enabled=dev.type == "cuda"):
                loss = F.cross_entropy(model(x), labels.to(dev))
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            if cfg.schedule == "onecycle":
                sched.step()
            done = epoch * steps_per_epoch + step + 1
            if epoch == start_epoch and len(step_times) <= TIMED_STEPS:
                step_times.append(time.perf_counter() - tick)
                if len(step_times) == TIMED_STEPS + 1 or step == steps_per_epoch - 1:
                    progress.estimate(_estimate(step_times, total_steps - done, cfg.epochs - epoch, model, norm,
                                                test, dev), len(step_times[1:]) or 1)
            progress.step(done, total_steps, epoch, loss.item())
        if spec.lazy:
            reader.close()  # ends the epoch's DataLoader (its workers) before the evaluation starts its own
        if cfg.schedule == "multistep":
            sched.step()  # the authors step it once per epoch
        acc = evaluate(model, test, None, norm, dev)
        history.append(round(acc, 2))
        if epoch + 1 < cfg.epochs:
            atomic_torch_save(partial, {
                "settings": asdict(cfg), "epoch": epoch + 1, "history": history,
                "seconds": seconds_before + time.time() - started, "model": model.state_dict(),
                "optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "generator": gen.get_state(),
                "scaler": scaler.state_dict() if scaler.is_enabled() else None,
                "rng": rng_state()})
        progress.epoch(epoch, acc)
    state_dict = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    if cfg.half:
        state_dict = {k: v.half() if v.is_floating_point() else v for k, v in state_dict.items()}
        # the score is the stored weights' score: evaluate them as loading will see them
        model.load_state_dict(upcast(state_dict))
        acc = evaluate(model, test, None, norm, dev)
    atomic_torch_save(ckpt, state_dict)
    sidecar = {
        "arch": resolved,
        "variant": variant,
        "requested_arch": arch,
        "dataset": spec.name,
        "num_classes": spec.num_classes,
        "in_chans": spec.channels,
        "image_size": spec.image_size,
        "test_accuracy": round(acc, 2),
        "normalization": norm.values,
        "epoch_accuracies": history,
        "sha256": sha256_file(ckpt),
        "stored_dtype": "float16" if cfg.half else "float32",
        "train_settings": asdict(cfg),
        "train_seconds": round(seconds_before + time.time() - started, 1),
        "device": device_name(dev),
        "command": train_command(spec.name, arch, cfg),
        "versions": versions(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    atomic_write_json(side, sidecar)
    partial.unlink(missing_ok=True)
    return sidecar


def _estimate(step_times: list[float], steps_left: int, epochs_left: int, model: nn.Module, norm: Normalizer,
              test: ImageSplit, dev: torch.device) -> float:
    """Seconds the remaining steps and evaluations should take, from the timed steps and one timed eval batch."""
    timed = step_times[1:] or step_times  # the first step pays one-off warm-up costs
    per_step = sum(timed) / len(timed)
    tick = time.perf_counter()
    batches = test.batches(512)
    images, labels = next(batches)
    batches.close()
    evaluate(model, images, labels, norm, dev)
    per_eval = (time.perf_counter() - tick) * len(test) / max(1, len(labels))
    return per_step * steps_left + per_eval * epochs_left


def _read_partial(path: Path, cfg: TeacherTrainConfig, dataset: str, arch: str) -> dict[str, Any] | None:
    """The state of an interrupted training with these settings, ``None`` when there is none."""
    if not path.is_file():
        return None
    try:
        state = safe_load(path, "teacher training checkpoint")
        settings, epoch = json.loads(json.dumps(state["settings"])), int(state["epoch"])
    except DfkdError as exc:
        raise DfkdError(f"cannot resume the teacher training in {path}: {str(exc).replace(str(path), 'it')}; "
                        "delete it to start over") from None
    except Exception as exc:  # a torn or foreign file: say which and how to start over
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DfkdError(f"cannot resume the teacher training in {path} ({first}); delete it to start over") from None
    mine = json.loads(json.dumps(asdict(cfg)))  # tuples as lists, as they were saved
    if settings != mine:
        diff = ", ".join(f"{k} {settings.get(k)!r}" for k in mine if settings.get(k) != mine[k])
        raise DfkdError(f"{path} holds an interrupted training of {arch} on {dataset} with other settings "
                        f"({diff}); train with those to resume it, or delete the file to start over")
    if not 0 < epoch < cfg.epochs:
        raise DfkdError(f"{path} records epoch {epoch} of {cfg.epochs}; delete it to start over")
    return state


def upcast(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """float16/bfloat16 tensors of a stored state dict -> float32; other tensors unchanged."""
    return {k: v.float() if v.is_floating_point() else v for k, v in state.items()}


def list_teachers(store: Path) -> list[dict[str, Any]]:
    out = []
    for side in sorted(Path(store).glob("*/*.json")):
        try:
            meta = json.loads(side.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        meta["path"] = str(side.with_suffix(".pt"))
        out.append(meta)
    return out


def load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A model's state dict from a checkpoint in the layouts code bases save, loaded safely
    (``weights_only=True``), with a one-line :class:`DfkdError` for every failure.

    Accepted: a plain ``{name: tensor}`` dict, or one nested under a key in :data:`NESTED_KEYS`
    (``{'state_dict': ...}`` as CMI, Fast-Datafree, CSD, NAYER and timm's train.py save it; ``model``,
    ``model_state_dict`` and ``net`` as other trainers do) beside non-tensor entries (epoch, accuracy,
    optimizer). A prefix every key carries from a wrapper, ``module.`` (DataParallel, DDP) or
    ``_orig_mod.`` (``torch.compile``), is removed.
    """
    obj = safe_load(Path(path), "checkpoint")
    if isinstance(obj, dict) and not _all_tensors(obj):
        nested = next((k for k in NESTED_KEYS if isinstance(obj.get(k), dict) and _all_tensors(obj[k])), None)
        if nested is None:
            keys = ", ".join(repr(k) for k in list(obj)[:8]) + (", ..." if len(obj) > 8 else "")
            raise DfkdError(f"{path} holds no state dict of tensors: its top-level keys are {keys}, none of them "
                            f"a dict of tensors under one of {', '.join(NESTED_KEYS)}")
        obj = obj[nested]
    if not isinstance(obj, dict) or not obj:
        raise DfkdError(f"{path} does not hold a state dict of tensors (it holds a {type(obj).__name__})")
    return strip_wrapper_prefixes(obj)


# where checkpoints keep the weights beside other entries, in the order they are looked up
NESTED_KEYS = ("state_dict", "model_state_dict", "model", "net")
WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def _all_tensors(obj: dict) -> bool:
    return bool(obj) and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())


def strip_wrapper_prefixes(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` without a ``module.`` / ``_orig_mod.`` prefix that every key carries (nested ones too,
    e.g. ``module._orig_mod.``)."""
    changed = True
    while changed:
        changed = False
        for prefix in WRAPPER_PREFIXES:
            if all(k.startswith(prefix) for k in state):
                state = {k[len(prefix):]: v for k, v in state.items()}
                changed = True
    return state


def load_weights(model: nn.Module, state: dict[str, torch.Tensor], source: str, arch: str) -> None:
    """Load ``state`` into ``model`` strictly, explaining mismatches in one line."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        raise DfkdError(f"{source} is not a '{arch}' checkpoint: {len(missing)} missing and "
                        f"{len(unexpected)} unexpected tensors (e.g. {(missing or unexpected)[0]})")
    for k, v in state.items():
        if own[k].shape != v.shape:
            raise DfkdError(f"{source} does not fit '{arch}' with this dataset: tensor {k} has shape "
                            f"{tuple(v.shape)}, the model expects {tuple(own[k].shape)} "
                            "(another number of classes or channels?)")
    model.load_state_dict(upcast(state))


def load_teacher(spec: DatasetSpec, arch: str, store: Path | None = None,
                 checkpoint: Path | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """The stored teacher for (dataset, arch), or the explicit ``checkpoint``; frozen, eval mode."""
    store = Path(store) if store else default_store()
    base, variant = split_teacher(arch)
    resolved = resolve_model_name(base, spec.image_size)
    if checkpoint is None:
        ckpt, side = teacher_paths(store, spec.name, stored_name(arch, spec.image_size))
        if not ckpt.is_file():
            if base.startswith(EXPLICIT_TIMM_PREFIX) and spec.num_classes == 1000:
                how = (f"store timm's pretrained weights with --set teacher_pretrained=true, or: dfkd-bench teacher "
                       f"pretrained {arch} --dataset {spec.name} [--weights FILE]")
            elif variant_seed(arch) is not None:
                how = f"create it with: {train_command(spec.name, arch)}"
            else:
                how = f"import it with: dfkd-bench teacher import FILE --arch {arch} --dataset {spec.name}"
            raise DfkdError(f"no {stored_name(arch, spec.image_size)} teacher for {spec.name} in {store}; {how}")
        meta = read_json_object(side, "a teacher's sidecar; delete it or restore it") if side.is_file() else {}
    else:
        ckpt, meta = Path(checkpoint), {}
        side = ckpt.with_suffix(".json")
        if side.is_file():
            meta = read_json_object(side, "a teacher's sidecar; delete it or restore it")
    digest = sha256_file(ckpt) if ckpt.is_file() else None
    if meta.get("sha256") and digest != meta["sha256"]:
        raise DfkdError(f"{ckpt} does not match the sha256 in its sidecar (truncated or replaced?); "
                        f"retrain it with: {train_command(spec.name, arch)}")
    model = create_model(base, spec.num_classes, spec.channels, spec.image_size)
    load_weights(model, load_state_dict(ckpt), str(ckpt), resolved)
    model.eval().requires_grad_(False)
    meta = {**meta, "arch": resolved, "variant": variant, "path": str(ckpt), "sha256": digest}
    return model, meta


# ---------------------------------------------------------------- foreign checkpoints

def _natural_key(key: str) -> list:
    return [int(p) if p.isdigit() else p for p in key.replace(".", " . ").split()]


def _conv_bn_prefixes(keys: list[str], pattern: str) -> list[str]:
    """Module prefixes (in network order) of the conv/BN layers whose keys start with ``pattern``."""
    prefixes = {k.rsplit(".", 1)[0] for k in keys if k.startswith(pattern)}
    return sorted(prefixes, key=_natural_key)


def convert_cmi_state_dict(state: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Rename the keys of a checkpoint from the CMI/Fast/CSD code base to this zoo's model.

    Their WRN nests blocks under ``blockN.layer.i`` with ``convShortcut`` and a final ``bn1``;
    their CIFAR ResNet calls the classifier ``linear``; their VGG keeps conv/BN pairs in
    ``blockN.j`` and the classifier in ``classifier``.
    """
    from .zoo import SmallImageResNet, SmallImageVGG, WideResNet

    out: dict[str, torch.Tensor] = {}
    if isinstance(model, WideResNet):
        for k, v in state.items():
            k = k.replace(".layer.", ".").replace("convShortcut", "project")
            if k.startswith("bn1."):
                k = "bn_final." + k[len("bn1."):]
            out[k] = v
    elif isinstance(model, SmallImageResNet):
        out = {("fc." + k[len("linear."):]) if k.startswith("linear.") else k: v for k, v in state.items()}
    elif isinstance(model, SmallImageVGG):
        theirs = _conv_bn_prefixes(list(state), "block")
        ours = [name for name, m in model.features.named_modules()
                if isinstance(m, (nn.Conv2d, nn.BatchNorm2d))]
        if len(theirs) != len(ours):
            raise DfkdError(f"the checkpoint has {len(theirs)} conv/BN layers, the model {len(ours)}")
        rename = {t: f"features.{o}" for t, o in zip(theirs, ours)}
        for k, v in state.items():
            prefix, _, leaf = k.rpartition(".")
            if prefix in rename:
                out[f"{rename[prefix]}.{leaf}"] = v
            elif k.startswith("classifier."):
                out["fc." + k[len("classifier."):]] = v
            else:
                out[k] = v
    else:
        raise DfkdError(f"--format cmi converts the zoo's ResNets, WRNs and VGGs, not {type(model).__name__}")
    # older checkpoints lack BN's num_batches_tracked; it does not affect eval-mode outputs
    own = model.state_dict()
    for k, v in own.items():
        if k.endswith("num_batches_tracked") and k not in out:
            out[k] = v
    return out


IMPORT_FORMATS = {"cmi": convert_cmi_state_dict, "native": lambda state, model: state}


# The teachers the CMI authors released (zju-vipa/CMI README, "Pretrained teachers"; reused by Fast-Datafree,
# CSD, NAYER, CPNet, AdaDFKD and others): file name -> (dataset, architecture, the accuracy in % that README gives).
STANDARD_TEACHERS: dict[str, tuple[str, str, float]] = {
    "cifar10_resnet34.pth": ("cifar10", "resnet34", 95.70),
    "cifar10_vgg11.pth": ("cifar10", "vgg11", 92.25),
    "cifar10_wrn_40_2.pth": ("cifar10", "wrn40_2", 94.87),
    "cifar100_resnet34.pth": ("cifar100", "resnet34", 78.05),
    "cifar100_vgg11.pth": ("cifar100", "vgg11", 71.32),
    "cifar100_wrn_40_2.pth": ("cifar100", "wrn40_2", 75.83),
}
STANDARD_SOURCE = "zju-vipa/CMI README (pretrained teachers)"
PUBLISHED_TOLERANCE = 0.5  # points: a larger gap means another normalization, another file, or other test data


def teacher_normalization(meta: dict[str, Any], spec: DatasetSpec) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The (mean, std) a teacher expects its [0, 1] pixels normalized with: its sidecar's ``normalization``,
    else (sidecars written before it was recorded) its dataset's, which is what those teachers were trained with."""
    recorded = meta.get("normalization")
    if recorded:
        return tuple(recorded["mean"]), tuple(recorded["std"])
    return tuple(spec.mean), tuple(spec.std)


def check_normalization(mean: tuple[float, ...], std: tuple[float, ...], spec: DatasetSpec) -> None:
    """Raises :class:`DfkdError` unless ``mean`` and ``std`` hold one finite value per channel and std > 0."""
    for name, values in (("mean", mean), ("std", std)):
        if len(values) != spec.channels or not all(math.isfinite(v) for v in values):
            raise DfkdError(f"--{name} needs {spec.channels} finite number(s) for {spec.name}, got "
                            f"{','.join(map(str, values))}")
    if not all(v > 0 for v in std):
        raise DfkdError(f"--std must be positive, got {','.join(map(str, std))}")


def import_teacher(path: Path, fmt: str, spec: DatasetSpec, arch: str, store: Path,
                   device: str = "auto", force: bool = False, mean: tuple[float, ...] | None = None,
                   std: tuple[float, ...] | None = None) -> dict[str, Any]:
    """Convert a foreign teacher checkpoint, verify every tensor maps, measure it, store it. A teacher
    already stored for (dataset, arch) is replaced only with ``force`` (else :class:`DfkdError`).

    The sidecar records the normalization the checkpoint was trained with: ``mean``/``std`` when given,
    else the dataset's (for CIFAR, the released teachers'); the test accuracy is measured under it. A file
    named as one of :data:`STANDARD_TEACHERS` also gets ``standard``: what it is and its published accuracy.
    """
    if fmt not in IMPORT_FORMATS:
        raise DfkdError(f"unknown import format '{fmt}' (valid: {', '.join(IMPORT_FORMATS)})")
    if (mean is None) != (std is None):
        raise DfkdError("--mean and --std go together: give both, or neither for the dataset's normalization")
    mean, std = (tuple(mean), tuple(std)) if mean is not None else (tuple(spec.mean), tuple(spec.std))
    check_normalization(mean, std, spec)
    base, _ = split_teacher(arch)
    resolved, name = resolve_model_name(base, spec.image_size), stored_name(arch, spec.image_size)
    refuse_replacing(teacher_paths(store, spec.name, name)[0], force)
    model = create_model(base, spec.num_classes, spec.channels, spec.image_size)
    state = IMPORT_FORMATS[fmt](load_state_dict(Path(path)), model)
    load_weights(model, state, str(path), resolved)
    source = {"imported_from": str(path), "import_format": fmt, "source_sha256": sha256_file(Path(path)),
              "command": f"dfkd-bench teacher import --format {fmt} {path} --arch {arch} --dataset {spec.name}"}
    standard = STANDARD_TEACHERS.get(Path(path).name)
    if standard is not None:
        source["standard"] = {"file": Path(path).name, "dataset": standard[0], "arch": standard[1],
                              "published_accuracy": standard[2], "source": STANDARD_SOURCE}
    return _store_measured(model, spec, arch, store, mean, std, device, source)


def _store_measured(model: nn.Module, spec: DatasetSpec, arch: str, store: Path, mean: tuple[float, ...],
                    std: tuple[float, ...], device: str, source: dict[str, Any]) -> dict[str, Any]:
    """Measure a teacher that was not trained here under (mean, std), store its weights and sidecar (the
    shared fields, then ``source``: where it came from and the command). Returns the sidecar."""
    base, variant = split_teacher(arch)
    accuracy = _measure(model, spec, mean, std, device)
    ckpt, side = teacher_paths(store, spec.name, stored_name(arch, spec.image_size))
    atomic_torch_save(ckpt, {k: v.detach().cpu() for k, v in model.state_dict().items()})
    sidecar = {
        "arch": resolve_model_name(base, spec.image_size), "variant": variant, "requested_arch": arch,
        "dataset": spec.name, "num_classes": spec.num_classes, "in_chans": spec.channels,
        "image_size": spec.image_size, "test_accuracy": accuracy, "normalization": Normalizer(mean, std).values,
        "sha256": sha256_file(ckpt), **source,
        "versions": versions(), "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    atomic_write_json(side, sidecar)
    return sidecar


# ---------------------------------------------------------------- pretrained timm teachers

def _measure(model: nn.Module, spec: DatasetSpec, mean: tuple[float, ...], std: tuple[float, ...],
             device: str) -> float | None:
    """Test accuracy (percent, 2 decimals) of ``model`` under (mean, std), or None when the test split is absent."""
    try:
        test = spec.split("test")
    except DfkdError:
        return None  # no test data here: stored without a measured accuracy
    dev = select_device(device)
    model.to(dev)
    return round(evaluate(model, test, None, Normalizer(mean, std).to(dev), dev), 2)


def import_pretrained(spec: DatasetSpec, arch: str, store: Path, weights: str = "", device: str = "auto",
                      force: bool = False) -> dict[str, Any]:
    """Store timm's pretrained weights for ``arch`` (``timm:<model>[.<tag>]``, e.g. ``timm:resnet50`` or
    ``timm:resnet50.tv_in1k``, torchvision's weights, the teacher of Fast's and DeepInversion's ImageNet rows)
    as the teacher of ``spec``: fetched by timm (Hugging Face hub or its cache), or read from ``weights``, a
    local state-dict file, through timm's own ``pretrained_cfg_overlay={'file': ...}``. The sidecar records
    timm's normalization for the weights (``pretrained_cfg`` mean/std), the source and the measured test accuracy.

    Raises:
        DfkdError: not a ``timm:`` name; the weights cannot be fetched (offline) or read; they classify another
            number of classes than ``spec`` has; or a teacher is stored already (without ``force``).
    """
    base, _ = split_teacher(arch)
    if not base.startswith(EXPLICIT_TIMM_PREFIX):
        raise DfkdError(f"pretrained weights come from timm: name the teacher timm:<model> (e.g. timm:resnet50), "
                        f"not '{arch}'")
    resolved = resolve_model_name(base, spec.image_size)
    refuse_replacing(teacher_paths(store, spec.name, stored_name(arch, spec.image_size))[0], force)
    import timm

    overlay = {}
    if weights:
        if not Path(weights).is_file():
            raise DfkdError(f"teacher_weights: no file {weights}")
        overlay = {"pretrained_cfg_overlay": {"file": str(Path(weights).resolve())}}
    try:
        model = timm.create_model(resolved, pretrained=True, in_chans=spec.channels, **overlay)
    except Exception as exc:  # hub, network, file-format and key errors all end here
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
        if weights:
            raise DfkdError(f"cannot load {weights} as timm's {resolved} weights: {first}") from None
        raise DfkdError(f"timm could not fetch the pretrained weights of {resolved} ({type(exc).__name__}); offline, "
                        f"download them where there is a network and pass --set teacher_weights=FILE (a state dict "
                        "of that timm model), or fill the Hugging Face cache ($HF_HOME)") from None
    if model.num_classes != spec.num_classes:
        raise DfkdError(f"timm's {resolved} weights classify {model.num_classes} classes; {spec.name} has "
                        f"{spec.num_classes}")
    check_model_input(model, base, spec.channels, spec.image_size, spec.num_classes)
    cfg = model.pretrained_cfg
    mean, std = tuple(cfg.get("mean", spec.mean)), tuple(cfg.get("std", spec.std))
    if len(mean) != spec.channels:
        mean, std = tuple(spec.mean), tuple(spec.std)
    source = {"pretrained": {"source": "timm", "tag": cfg.get("tag"), "hf_hub_id": cfg.get("hf_hub_id"),
                             "file": str(Path(weights).resolve()) if weights else None,
                             "file_sha256": sha256_file(Path(weights)) if weights else None},
              "command": f"dfkd-bench teacher pretrained {arch} --dataset {spec.name}"
                         + (f" --weights {weights}" if weights else "")}
    return _store_measured(model, spec, arch, store, mean, std, device, source)
