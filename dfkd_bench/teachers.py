"""Teacher store: train a teacher once, keep it with a sidecar that says how, find it later.

Layout: ``<store>/<dataset>/<arch>.pt`` (the state dict) and ``<arch>.json`` (arch, dataset,
test accuracy, sha256, training settings, versions). The store is ``$DFKD_BENCH_TEACHERS``
or ``./teachers``.
"""

from __future__ import annotations

import json
import os
import pickle
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from .augment import crop_flip
from .data import DatasetSpec, Normalizer, evaluate, to_unit
from .errors import DfkdError
from .runtime import atomic_torch_save, atomic_write_json, seed_everything, select_device, sha256_file, versions
from .zoo import create_model, resolve_model_name


def default_store() -> Path:
    return Path(os.environ.get("DFKD_BENCH_TEACHERS", "teachers"))


@dataclass
class TeacherTrainConfig:
    epochs: int = 4
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    seed: int = 0
    augment: bool = True
    limit: int = 0  # train on the first N training images only (smoke tests); 0 = all


def teacher_paths(store: Path, dataset: str, arch: str) -> tuple[Path, Path]:
    folder = Path(store) / dataset
    return folder / f"{arch}.pt", folder / f"{arch}.json"


def train_command(dataset: str, arch: str) -> str:
    return f"dfkd-bench teacher train --dataset {dataset} --arch {arch}"


def train_teacher(spec: DatasetSpec, arch: str, cfg: TeacherTrainConfig, store: Path, device: str = "auto",
                  on_step: Callable[[int, int, int, float], None] | None = None,
                  on_epoch: Callable[[int, float], None] | None = None) -> dict[str, Any]:
    """Train ``arch`` on the real train split, evaluate on the test split, store it. Returns the sidecar."""
    dev = select_device(device)
    seed_everything(cfg.seed)
    resolved = resolve_model_name(arch, spec.image_size)
    model = create_model(arch, spec.num_classes, spec.channels, spec.image_size).to(dev)
    train_x, train_y = spec.load("train")
    if cfg.limit:
        train_x, train_y = train_x[:cfg.limit], train_y[:cfg.limit]
    test_x, test_y = spec.load("test")
    norm = Normalizer(spec.mean, spec.std).to(dev)
    aug = crop_flip(spec.image_size).to(dev) if cfg.augment else nn.Identity()
    steps_per_epoch = max(1, len(train_x) // cfg.batch_size)
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=cfg.epochs * steps_per_epoch,
                                                pct_start=0.15)
    gen = torch.Generator().manual_seed(cfg.seed)
    started = time.time()
    acc = 0.0
    for epoch in range(cfg.epochs):
        model.train()
        order = torch.randperm(len(train_x), generator=gen)
        for step in range(steps_per_epoch):
            idx = order[step * cfg.batch_size:(step + 1) * cfg.batch_size]
            x = norm(aug(to_unit(train_x[idx].to(dev))))
            with torch.autocast(dev.type, enabled=dev.type == "cuda"):
                loss = F.cross_entropy(model(x), train_y[idx].to(dev))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            if on_step:
                on_step(epoch * steps_per_epoch + step + 1, cfg.epochs * steps_per_epoch, epoch, loss.item())
        acc = evaluate(model, test_x, test_y, norm, dev)
        if on_epoch:
            on_epoch(epoch, acc)
    ckpt, side = teacher_paths(store, spec.name, resolved)
    atomic_torch_save(ckpt, {k: v.detach().cpu() for k, v in model.state_dict().items()})
    sidecar = {
        "arch": resolved,
        "requested_arch": arch,
        "dataset": spec.name,
        "num_classes": spec.num_classes,
        "in_chans": spec.channels,
        "image_size": spec.image_size,
        "test_accuracy": round(acc, 2),
        "sha256": sha256_file(ckpt),
        "train_settings": asdict(cfg),
        "train_seconds": round(time.time() - started, 1),
        "command": train_command(spec.name, arch) + f" --epochs {cfg.epochs} --seed {cfg.seed}"
                   + (f" --limit {cfg.limit}" if cfg.limit else ""),
        "versions": versions(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    atomic_write_json(side, sidecar)
    return sidecar


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
    """Load a checkpoint safely (``weights_only=True``), with a one-line error for every failure."""
    if not Path(path).is_file():
        raise DfkdError(f"checkpoint {path} does not exist")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else "unpickling failed"
        if "Unsupported global" in str(exc):  # a class or function reference: code would run
            raise DfkdError(f"refusing {path}: it needs pickled code to load (weights_only=True); "
                            "re-save it as a plain state dict") from None
        raise DfkdError(f"{path} is not a readable checkpoint: {reason}") from None
    except Exception as exc:  # torch's unpickler raises anything (IndexError, KeyError, ...) on garbage
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DfkdError(f"{path} is not a readable checkpoint (truncated or corrupt?): {first}") from None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise DfkdError(f"{path} does not hold a state dict of tensors")
    return obj


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
    model.load_state_dict(state)


def load_teacher(spec: DatasetSpec, arch: str, store: Path | None = None,
                 checkpoint: Path | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """The stored teacher for (dataset, arch), or the explicit ``checkpoint``; frozen, eval mode."""
    store = Path(store) if store else default_store()
    resolved = resolve_model_name(arch, spec.image_size)
    if checkpoint is None:
        ckpt, side = teacher_paths(store, spec.name, resolved)
        if not ckpt.is_file():
            raise DfkdError(f"no {resolved} teacher for {spec.name} in {store}; create it with: "
                            f"{train_command(spec.name, arch)}")
        meta = json.loads(side.read_text()) if side.is_file() else {}
    else:
        ckpt, meta = Path(checkpoint), {}
        side = ckpt.with_suffix(".json")
        if side.is_file():
            meta = json.loads(side.read_text())
    digest = sha256_file(ckpt) if ckpt.is_file() else None
    if meta.get("sha256") and digest != meta["sha256"]:
        raise DfkdError(f"{ckpt} does not match the sha256 in its sidecar (truncated or replaced?); "
                        f"retrain it with: {train_command(spec.name, arch)}")
    model = create_model(arch, spec.num_classes, spec.channels, spec.image_size)
    load_weights(model, load_state_dict(ckpt), str(ckpt), resolved)
    model.eval().requires_grad_(False)
    meta = {**meta, "arch": resolved, "path": str(ckpt), "sha256": digest}
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


def import_teacher(path: Path, fmt: str, spec: DatasetSpec, arch: str, store: Path,
                   device: str = "auto") -> dict[str, Any]:
    """Convert a foreign teacher checkpoint, verify every tensor maps, measure it, store it."""
    if fmt not in IMPORT_FORMATS:
        raise DfkdError(f"unknown import format '{fmt}' (valid: {', '.join(IMPORT_FORMATS)})")
    resolved = resolve_model_name(arch, spec.image_size)
    model = create_model(arch, spec.num_classes, spec.channels, spec.image_size)
    state = IMPORT_FORMATS[fmt](load_state_dict(Path(path)), model)
    load_weights(model, state, str(path), resolved)
    accuracy = None
    try:
        test_x, test_y = spec.load("test")
    except DfkdError:
        test_x = None  # no test data here: store it without a measured accuracy
    if test_x is not None:
        dev = select_device(device)
        model.to(dev)
        accuracy = round(evaluate(model, test_x, test_y, Normalizer(spec.mean, spec.std).to(dev), dev), 2)
    ckpt, side = teacher_paths(store, spec.name, resolved)
    atomic_torch_save(ckpt, {k: v.detach().cpu() for k, v in model.state_dict().items()})
    sidecar = {
        "arch": resolved, "requested_arch": arch, "dataset": spec.name, "num_classes": spec.num_classes,
        "in_chans": spec.channels, "image_size": spec.image_size, "test_accuracy": accuracy,
        "sha256": sha256_file(ckpt),
        "imported_from": str(path), "import_format": fmt, "source_sha256": sha256_file(Path(path)),
        "command": f"dfkd-bench teacher import --format {fmt} {path} --arch {arch} --dataset {spec.name}",
        "versions": versions(), "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    atomic_write_json(side, sidecar)
    return sidecar
