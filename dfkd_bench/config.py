"""The run configuration: defaults <- the method's preset <- ``--set key=value``, type-checked.

Keys are run fields (``epochs``, ``lr``, ...), ``method.<field>`` for the method's own
config and ``loss.<field>`` for the distillation loss's. A bare key that is not a run
field is looked up in the method's config, then the loss's.
"""

from __future__ import annotations

import dataclasses
import math
import re
import typing
from dataclasses import dataclass, field
from typing import Any

from .errors import DfkdError
from .registry import LOSSES, SYNTHESIZERS, get_preset, unknown_name_message
from .settings import Settings, check_fields
from .zoo import DEFAULT_STUDENT, paper_student

AMP_DTYPES = ("float16", "bfloat16")
STUDENT_OPTIMIZERS = ("sgd", "adam")
LR_SCHEDULES = ("cosine", "step")


@dataclass
class RunConfig:
    """The shared protocol's settings. Every field can be set with ``--set``."""

    method: str = "deepinversion"
    dataset: str = "fashion-mnist"
    teacher: str = "wrn16_2"
    student: str = ""  # empty: the teacher's paper pair (zoo.PAPER_STUDENTS), else zoo.DEFAULT_STUDENT
    preset: str = "quick"
    seed: int = 0
    loss: str = ""  # distillation loss; empty means the method's paper default
    epochs: int = 10
    ep_steps: int = 200  # student steps per epoch
    kd_steps: int = 200  # student steps per synthesis round
    batch_size: int = 128  # student batch drawn from the pool
    synth_batch_size: int = 200  # images synthesized per round
    optimizer: str = "sgd"  # the student's: "sgd" (momentum, weight_decay) or "adam" (weight_decay; ZSKT's code)
    lr: float = 0.1
    lr_min: float = 0.0  # the cosine schedule's floor (eta_min; Fast's code uses 2e-4)
    lr_schedule: str = "cosine"  # the student's, stepped per epoch: "cosine" or "step" (DAFL's, DFAD's code)
    lr_milestones: tuple[int, ...] = ()  # "step": the (0-based) epochs from which the lr is multiplied by lr_gamma
    lr_gamma: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 1e-4
    temperature: float = 20.0
    grad_clip: float = 0.0  # clip the student's gradient norm at this value (0: off; ZSKT's code clips at 5)
    warmup_epochs: int = 0  # epochs that only synthesize (Fast)
    kd_augment: bool = True  # per-sample crop + flip on pool samples before distillation
    synthesis_only: bool = False  # build a pool (an init bank) without distilling
    init_bank: str = ""  # run folder whose pool this run starts from
    pool_in_memory: int = 0  # spill pool chunks to disk beyond this many images (0: never)
    # budgets: stop at the first one reached (0: no limit besides epochs)
    max_images: int = 0
    max_teacher_passes: int = 0
    max_seconds: float = 0.0
    max_epochs: int = 0  # stop after this many epochs of the schedule set by `epochs` (which it does not change)
    device: str = "auto"
    # Autocast (mixed precision), off by default: the authors' code runs float32, and on an H200 it bought no speed
    # at 28 px (results/gpu/nvidia-h200/README.md). float16 overflows a barely trained student's eval-mode
    # activations (CSD, ResNet-34 -> ResNet-18: non-finite images in round 1); bfloat16 keeps float32's range.
    amp: bool = False  # autocast on CUDA when set; on CPU only with amp_cpu as well
    amp_dtype: str = "bfloat16"  # autocast dtype; float16 also scales the loss (GradScaler), bfloat16 needs no scaler
    channels_last: bool = False  # teacher and student in channels_last memory format (speed option, off by default)
    compile: bool = False  # torch.compile the teacher's and student's forward_features (speed option, off by default)
    amp_cpu: bool = False  # with amp, autocast on CPU too: the AMP code path without a GPU (tests; slower than fp32)
    sync_bn_stats: bool = False  # data-parallel runs: BN-statistics losses on the global batch, not each rank's
    eval_batch_size: int = 512
    selection_images: int = 0  # >0: held-out synthetic images for the data-free checkpoint rule (selection.py)
    teacher_checkpoint: str = ""  # explicit teacher file instead of the store
    teacher_pretrained: bool = False  # a timm:<model> teacher missing from the store: store timm's pretrained weights
    teacher_weights: str = ""  # with teacher_pretrained: a local file of those weights (offline), read by timm
    method_cfg: dict[str, Any] = field(default_factory=dict)
    loss_cfg: dict[str, Any] = field(default_factory=dict)

    @property
    def rounds_per_epoch(self) -> int:
        return max(1, self.ep_steps // max(1, self.kd_steps))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _type_hints(cls: type) -> dict[str, Any]:
    """The settable fields of a dataclass and their types (class variables such as ``scope`` are not)."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def parse_value(raw: Any, typ: Any, key: str) -> Any:
    """Convert ``raw`` (a string from the command line, or a preset value) to ``typ``."""
    origin = typing.get_origin(typ)
    if origin is typing.Union or str(origin) == "types.UnionType":
        args = [a for a in typing.get_args(typ) if a is not type(None)]
        if isinstance(raw, str) and raw.lower() in ("none", "null"):
            return None
        return parse_value(raw, args[0], key)
    if origin in (tuple, list):
        inner = typing.get_args(typ)[0] if typing.get_args(typ) else float
        parts = raw if isinstance(raw, (list, tuple)) else [p for p in str(raw).strip("()[] ").split(",") if p]
        return origin(parse_value(p, inner, key) for p in parts)
    if origin is dict or typ is dict:
        if isinstance(raw, dict):
            return raw
        raise DfkdError(f"{key} cannot be set from the command line")
    try:
        if typ is bool:
            if isinstance(raw, bool):
                return raw
            text = str(raw).strip().lower()
            if text in ("1", "true", "yes", "on"):
                return True
            if text in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if typ is int:
            if isinstance(raw, bool) or (isinstance(raw, float) and not raw.is_integer()):
                raise ValueError
            if isinstance(raw, str):
                text = raw.strip()
                return int(float(text)) if "e" in text.lower() and float(text).is_integer() else int(text)
            return int(raw)
        if typ is float:
            if isinstance(raw, bool):
                raise ValueError
            return float(raw)
        if typ is str:
            return str(raw)
    except (TypeError, ValueError):
        pass
    else:
        return raw
    name = getattr(typ, "__name__", str(typ))
    raise DfkdError(f"--set {key}={raw}: expected a value of type {name}")


def parse_assignments(items: tuple[str, ...] | list[str]) -> dict[str, str]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise DfkdError(f"--set takes key=value, got '{item}'")
        out[key.strip()] = value.strip()
    return out


def _apply(target: dict[str, Any], hints: dict[str, Any], key: str, raw: Any, label: str) -> None:
    target[key] = parse_value(raw, hints[key], label)


def resolve_config(method: str, preset: str = "quick", overrides: dict[str, Any] | None = None,
                   notes: list[str] | None = None, **fields: Any) -> tuple[RunConfig, Any, Any]:
    """Build the run config, the method's config and the loss's config.

    ``notes``, when given, receives one line for each setting of the preset that does not apply
    (a ``loss.*`` key of the preset's loss when another ``--loss`` is chosen).

    Raises:
        DfkdError: an unknown method, preset or key, or a value its Config refuses (one line).
    """
    method_cls = SYNTHESIZERS.get(method)
    preset_values = get_preset(method, preset)
    run_hints = {k: v for k, v in _type_hints(RunConfig).items() if k not in ("method_cfg", "loss_cfg")}
    method_hints = _type_hints(method_cls.Config)
    run: dict[str, Any] = {}
    method_values: dict[str, Any] = {}
    loss_values: dict[str, Any] = {}
    staged = [(k, v, "preset") for k, v in preset_values.items()]
    staged += [(k, v, "field") for k, v in fields.items() if v is not None]
    overrides = dict(overrides or {})
    for key in ("loss",):  # the loss must be known before loss.* keys are checked
        if key in overrides:
            staged.append((key, overrides.pop(key), "--set"))
    loss_name = next((v for k, v, _ in reversed(staged) if k == "loss" and v), "") or method_cls.default_loss
    loss_cls = LOSSES.get(loss_name)
    loss_hints = _type_hints(loss_cls.Config)
    staged += [(k, v, "--set") for k, v in overrides.items()]
    for key, raw, source in staged:
        if source == "--set" and key in FIXED_BY_OPTIONS:
            raise DfkdError(f"--set {key}={raw}: {key} is not a setting; choose it with {FIXED_BY_OPTIONS[key]}")
        if key.startswith("method."):
            sub = key[len("method."):]
            if sub not in method_hints:
                raise DfkdError(unknown_name_message(f"setting of method {method}", sub, method_hints))
            _apply(method_values, method_hints, sub, raw, key)
        elif key.startswith("loss."):
            sub = key[len("loss."):]
            if sub not in loss_hints and source == "preset":
                # a preset pins its default loss's settings; another --loss has its own
                if notes is not None:
                    notes.append(f"preset '{preset}' sets {key}={raw}, which loss '{loss_name}' does not have: "
                                 "not applied")
                continue
            if sub not in loss_hints:
                raise DfkdError(unknown_name_message(f"setting of loss {loss_name}", sub, loss_hints))
            _apply(loss_values, loss_hints, sub, raw, key)
        elif key in run_hints:
            _apply(run, run_hints, key, raw, key)
        elif key in method_hints:
            _apply(method_values, method_hints, key, raw, key)
        elif key in loss_hints:
            _apply(loss_values, loss_hints, key, raw, key)
        else:
            valid = list(run_hints) + [f"method.{k}" for k in method_hints] + [f"loss.{k}" for k in loss_hints]
            raise DfkdError(unknown_name_message("setting", key, valid))
    run["method"], run["preset"], run["loss"] = method, preset, loss_name
    meant_for = preset_values.get("dataset")
    if meant_for and run.get("dataset") != meant_for and notes is not None:
        notes.append(f"preset '{preset}' is the authors' setting for {meant_for}; this run is on {run.get('dataset')}")
    if not run.get("student"):
        run["student"] = paper_student(run.get("teacher", RunConfig.teacher)) or DEFAULT_STUDENT
    cfg = RunConfig(**run)
    if cfg.selection_images and (method_cls.real_data_split is not None or method_cls.student_is_teacher):
        raise DfkdError(f"selection_images: '{method}' synthesizes no images of its own to hold out")
    method_cfg = method_cls.Config(**method_values)  # a Settings subclass checks itself here
    loss_cfg = loss_cls.Config(**loss_values)
    for scope, values in (("method", method_cfg), ("loss", loss_cfg)):
        if not isinstance(values, Settings):  # a plugin's plain dataclass: the same field checks
            check_fields(values, scope)
    cfg.method_cfg = dataclasses.asdict(method_cfg)
    cfg.loss_cfg = dataclasses.asdict(loss_cfg)
    validate(cfg)
    return cfg, method_cfg, loss_cfg


# run keys that --set cannot change: the command line chooses them
FIXED_BY_OPTIONS = {"method": "--method", "preset": "--preset", "method_cfg": "method.KEY=VALUE",
                    "loss_cfg": "loss.KEY=VALUE"}
MAX_BATCH = 2**20  # images in one batch: far beyond any published setting, and a typo's guard


def validate(cfg: RunConfig) -> None:
    positive = ("epochs", "ep_steps", "kd_steps", "batch_size", "synth_batch_size", "eval_batch_size")
    for name in positive:
        if getattr(cfg, name) <= 0:
            raise DfkdError(f"{name} must be positive, got {getattr(cfg, name)}")
    for name in ("batch_size", "synth_batch_size", "eval_batch_size"):
        if getattr(cfg, name) > MAX_BATCH:
            raise DfkdError(f"{name} must be at most {MAX_BATCH} images, got {getattr(cfg, name)}")
    for name in ("max_images", "max_teacher_passes", "max_seconds", "max_epochs", "pool_in_memory", "warmup_epochs"):
        if getattr(cfg, name) < 0:
            raise DfkdError(f"{name} must be zero (no limit) or positive, got {getattr(cfg, name)}")
    if not 0 <= cfg.selection_images <= MAX_BATCH:
        raise DfkdError(f"selection_images must be zero (off) or a positive count up to {MAX_BATCH}, got "
                        f"{cfg.selection_images}")
    for name in ("lr", "lr_min", "temperature", "momentum", "weight_decay", "grad_clip"):
        value = getattr(cfg, name)
        strictly = name in ("lr", "temperature")
        if not math.isfinite(value) or value < 0 or (value == 0 and strictly):
            kind = "positive" if strictly else "non-negative"
            raise DfkdError(f"{name} must be a finite {kind} number, got {value}")
    if cfg.lr_min > cfg.lr:
        raise DfkdError(f"lr_min ({cfg.lr_min}) must not exceed lr ({cfg.lr})")
    from .data import get_dataset  # importing it registers the datasets

    get_dataset(cfg.dataset)  # an unknown name: one line listing the known ones
    if not re.fullmatch(r"auto|cpu|cuda(:[0-9]+)?", cfg.device):
        raise DfkdError(f"unknown device '{cfg.device}'; use auto, cpu, cuda or cuda:N")
    if not math.isfinite(cfg.max_seconds):
        raise DfkdError(f"max_seconds must be finite, got {cfg.max_seconds}")
    if cfg.optimizer not in STUDENT_OPTIMIZERS:
        raise DfkdError(f"optimizer must be one of {', '.join(STUDENT_OPTIMIZERS)}, got '{cfg.optimizer}'")
    if cfg.lr_schedule not in LR_SCHEDULES:
        raise DfkdError(f"lr_schedule must be one of {', '.join(LR_SCHEDULES)}, got '{cfg.lr_schedule}'")
    if cfg.lr_schedule == "step":
        _check_milestones(cfg)
    elif cfg.lr_milestones:
        raise DfkdError("lr_milestones apply to lr_schedule=step only")
    if cfg.amp_dtype not in AMP_DTYPES:
        raise DfkdError(f"amp_dtype must be one of {', '.join(AMP_DTYPES)}, got '{cfg.amp_dtype}'")
    if cfg.warmup_epochs >= cfg.epochs and not cfg.synthesis_only:
        raise DfkdError(f"warmup_epochs ({cfg.warmup_epochs}) must be below epochs ({cfg.epochs})")


def _check_milestones(cfg: RunConfig) -> None:
    if cfg.lr_min > 0:
        raise DfkdError("lr_min is the cosine schedule's floor; lr_schedule=step has none")
    if not (math.isfinite(cfg.lr_gamma) and 0 < cfg.lr_gamma <= 1):
        raise DfkdError(f"lr_gamma must be in (0, 1], got {cfg.lr_gamma}")
    ms = list(cfg.lr_milestones)
    if not ms:
        raise DfkdError("lr_schedule=step needs lr_milestones, e.g. --set lr_milestones=100,150")
    if ms != sorted(set(ms)) or ms[0] <= cfg.warmup_epochs or ms[-1] >= cfg.epochs:
        raise DfkdError(f"lr_milestones must increase and lie after the warm-up and before epochs "
                        f"({cfg.warmup_epochs} < m < {cfg.epochs}), got {','.join(map(str, ms))}")


# `--budget KIND=N`: the run field each kind sets, and the type of N
BUDGET_FIELDS = {"images": ("max_images", int), "teacher_passes": ("max_teacher_passes", int),
                 "seconds": ("max_seconds", float), "epochs": ("max_epochs", int)}


def parse_budgets(items: tuple[str, ...] | list[str]) -> dict[str, str]:
    """``--budget images=5000`` -> ``{"max_images": "5000"}``.

    Raises:
        DfkdError: an unknown kind, or a value that is not a positive, finite number of its type.
    """
    out = {}
    for item in items:
        kind, _, value = item.partition("=")
        if kind not in BUDGET_FIELDS:
            raise DfkdError(f"--budget takes {', '.join(f'{k}=N' for k in BUDGET_FIELDS)}, got '{item}'")
        name, cast = BUDGET_FIELDS[kind]
        try:
            number = cast(value)
        except ValueError:
            raise DfkdError(f"--budget {item}: '{value}' is not a {cast.__name__}") from None
        if not number > 0 or number == float("inf"):
            raise DfkdError(f"--budget {item}: a budget must be a positive, finite number")
        out[name] = value
    return out
