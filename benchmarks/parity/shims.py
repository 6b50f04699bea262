"""What the authors' code needs to run here (CPU, 1-channel 28 px images, today's libraries),
and nothing more: device and I/O plumbing, never a method's math.

Every shim is undone when :func:`installed` exits, and the ones that applied are reported,
so a result says exactly how the reference code was run. README.md lists them with reasons.
"""

from __future__ import annotations

import contextlib
import importlib
import sys
import types
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.data

from dfkd_bench.errors import DfkdError

# The files that tell the three repositories apart (each also ships datafree/synthesis/contrastive.py).
_MARKERS = (("CSD", "datafree/synthesis/csd.py"), ("CPNet", "datafree/synthesis/cpnet.py"),
            ("NAYER", "datafree/synthesis/nayer.py"), ("AdaDFKD", "datafree/synthesis/adadfkd.py"),
            ("Fast-Datafree", "datafree/synthesis/fast.py"), ("CMI", "datafree/synthesis/contrastive.py"))

# skgyu/SpaceshipNet is not the datafree-package layout: its code lives under code/SpaceshipNet of the repository root
# (the path given with --reference), and its V37 trainer file is what marks it (benchmarks/parity/spaceship.py).
SPACESHIP_CODE = Path("code/SpaceshipNet")
SPACESHIP_MARKER = SPACESHIP_CODE / "models/model_CFE_mSARC_bases/model_CFE_mSARC_base_V37.py"


def detect_repo(checkout: Path) -> str:
    """Which authors' repository ``checkout`` is: 'CSD', 'CPNet', 'NAYER', 'AdaDFKD', 'Fast-Datafree' or 'CMI' (in
    that order: CPNet's package also ships NAYER's nayer.py, NAYER's and AdaDFKD's (ljrprocc/DFKD, a fork of CMI)
    also ship Fast's fast.py and CMI's contrastive.py), or 'SpaceshipNet' (the repository root of skgyu/SpaceshipNet,
    recognized by its V37 trainer under code/SpaceshipNet)."""
    checkout = Path(checkout)
    if (checkout / SPACESHIP_MARKER).is_file():  # SpaceshipNet: the repository root, with its own layout
        return "SpaceshipNet"
    if not (checkout / "datafree" / "__init__.py").is_file():
        raise DfkdError(f"{checkout} is not a checkout of the authors' code (no datafree/__init__.py, nor "
                        f"{SPACESHIP_MARKER}); git clone https://github.com/luoshiya/CSD (or zju-vipa/Fast-Datafree, "
                        "zju-vipa/CMI, tmtuan1307/NAYER, LannCX/CPNet, ljrprocc/DFKD, skgyu/SpaceshipNet)")
    for name, marker in _MARKERS:
        if (checkout / marker).is_file():
            return name
    raise DfkdError(f"{checkout} has a datafree package but none of {', '.join(m for _, m in _MARKERS)}")


class ClassifierInterface(nn.Module):
    """Shim: a dfkd-bench zoo Wide ResNet behind the authors' classifier signature.

    ``forward(x, return_features=True)`` returns ``(logits, [f1, f2, f3, f4])`` with the meaning
    of CSD's WideResNet (datafree/models/classifiers/wresnet.py:84-101): f1..f3 the outputs of the
    three groups (f3 before the final BN-ReLU), f4 the globally pooled features; with
    ``pooled_features`` it returns ``(logits, f4)``, as CMI's, Fast-Datafree's and NAYER's
    WideResNet do (their wresnet.py:90-103). Both sides thus train the very same network objects
    and weights. AdaDFKD's (ljrprocc/DFKD) WideResNet takes a third argument ``l``, the level to
    start from (wresnet.py:91-96), and AdaSynthesizer always passes ``l=0`` (synthesis/adadfkd.py:133,
    145, 158): the whole network, so ``l`` is accepted and only 0 is.
    """

    def __init__(self, model: nn.Module, pooled_features: bool = False):
        super().__init__()
        self.pooled_features = pooled_features
        missing = [a for a in ("conv1", "block1", "block2", "block3", "bn_final", "fc") if not hasattr(model, a)]
        if missing:
            raise DfkdError(f"the parity harness needs a zoo Wide ResNet (wrn*), got {type(model).__name__}")
        self.model = model

    @property
    def fc(self) -> nn.Module:
        """The classifier, where CPNet's synthesizer looks for it (synthesis/cpnet.py:69-74), and where AdaDFKD's
        reads the feature width of its queue from (synthesis/adadfkd.py:58-63, ``fc.in_features``)."""
        return self.model.fc

    def forward(self, x: torch.Tensor, return_features: bool = False, l: int = 0):  # noqa: E741 (their name)
        if l != 0:
            raise DfkdError(f"the zoo Wide ResNet runs whole (l=0), not from level l={l} (AdaDFKD wresnet.py:91-96)")
        m = self.model
        f1 = m.block1(m.conv1(x))
        f2 = m.block2(f1)
        f3 = m.block3(f2)
        f4 = m.forward_head(F.relu(m.bn_final(f3)), pre_logits=True)
        logits = m.fc(f4)
        if not return_features:
            return logits
        return (logits, f4) if self.pooled_features else (logits, [f1, f2, f3, f4])


class _PILFor1Channel:
    """PIL.Image as the authors' save_image_batch uses it, except that a (H, W, 1) array becomes
    a grayscale 'L' image (Pillow refuses that shape; their code only ever wrote RGB)."""

    def __init__(self, image_module: types.ModuleType):
        self._image = image_module

    def __getattr__(self, name: str) -> Any:
        return getattr(self._image, name)

    def fromarray(self, array: np.ndarray, *args: Any, **kwargs: Any):
        if array.ndim == 3 and array.shape[-1] == 1:
            array = array[..., 0]
        return self._image.fromarray(array, *args, **kwargs)


def _clip_images(image_tensor: torch.Tensor, mean, std) -> torch.Tensor:
    """The authors' clip_images (datafree/utils/_utils.py:83) over every channel instead of a
    hard-coded three: each channel clamped to the normalized image of [0, 1], in place."""
    for c, (m, s) in enumerate(zip(mean, std)):
        image_tensor[:, c] = torch.clamp(image_tensor[:, c], -m / s, (1 - m) / s)
    return image_tensor


class _SerialDataLoader(torch.utils.data.DataLoader):
    """DataLoader with num_workers=0 and no pinned memory: their synthesizers hard-code
    ``num_workers=4, pin_memory=True``, which on a shared 2-core CPU box only adds processes."""

    def __init__(self, *args: Any, **kwargs: Any):
        kwargs["num_workers"] = 0
        kwargs["pin_memory"] = False
        super().__init__(*args, **kwargs)


class _Patches:
    """Attribute patches that are all undone, in reverse order, on exit."""

    def __init__(self):
        self._undo: list[tuple[Any, str, Any]] = []
        self.applied: list[str] = []

    def set(self, obj: Any, attr: str, value: Any, name: str) -> None:
        self._undo.append((obj, attr, getattr(obj, attr)))
        setattr(obj, attr, value)
        if name not in self.applied:
            self.applied.append(name)

    def undo(self) -> None:
        for obj, attr, old in reversed(self._undo):
            setattr(obj, attr, old)
        self._undo.clear()


# The zoo Wide ResNet's nodes under CPNet's rule for wrn40_2 (datafree/models/generator.py:11: the final BN, then
# the first BN of groups 3, 2, 1), named as they are inside ClassifierInterface. get_cfg is called with this name.
ZOO_WRN_NODES = "zoo_wrn"
_ZOO_WRN_BN_NODES = ["model.bn_final", "model.block3.0.bn1", "model.block2.0.bn1", "model.block1.0.bn1"]


class _ColorJitterAnyChannels(nn.Module):
    """kornia's ColorJitter as CPNet builds it (synthesis/cpnet.py:86), except that a one-channel batch gets
    brightness and contrast only: saturation and hue need colour, and kornia refuses them on one channel.
    dfkd-bench's CPNet does the same (methods/cpnet.py, color_jitter)."""

    def __init__(self, brightness, contrast, saturation, hue, p=1.0, **kwargs: Any):
        super().__init__()
        import kornia.augmentation as K
        self.colour = K.ColorJitter(brightness, contrast, saturation, hue, p=p, **kwargs)
        self.gray = K.ColorJitter(brightness, contrast, 0.0, 0.0, p=p, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.colour(x) if x.shape[1] == 3 else self.gray(x)


class _KorniaAugmentation:
    """kornia.augmentation as CPNet's synthesis module sees it, with the ColorJitter above."""

    def __getattr__(self, name: str) -> Any:
        if name == "ColorJitter":
            return _ColorJitterAnyChannels
        import kornia.augmentation as K
        return getattr(K, name)


def _install_cpnet(patches: "_Patches", checkout: Path) -> None:
    """The shims CPNet's code needs to run on CPU with a zoo teacher (each named in the result)."""
    if not (checkout / "datafree" / "synthesis" / "cpnet.py").is_file():
        return
    cp_mod = importlib.import_module("datafree.synthesis.cpnet")
    gen_mod = importlib.import_module("datafree.models.generator")
    # synthesis/cpnet.py:188 logs `loss_dis`, which nothing defines: the first step raises NameError. A module
    # global of 0 lets the line run (it only feeds a printed average).
    cp_mod.loss_dis = torch.zeros(())
    patches.applied.append("cpnet-loss-dis")
    patches.set(cp_mod, "augmentation", _KorniaAugmentation(), "color-jitter-1-channel")
    patches.set(gen_mod, "_BN_NODES", {**gen_mod._BN_NODES, ZOO_WRN_NODES: _ZOO_WRN_BN_NODES}, "bn-nodes-zoo-wrn")
    # CoupledGenerator keys its saved maps by targets.device.index, None on CPU, and syn_img_list reads keys
    # 0..n-1 (generator.py:319-355): file the CPU's maps under 0
    original = gen_mod.CoupledGenerator.forward

    def forward(self, targets):
        out = original(self, targets)
        if None in self.syn_dict:
            self.syn_dict[0] = self.syn_dict.pop(None)
        return out

    patches.set(gen_mod.CoupledGenerator, "forward", forward, "cpu-device-index")


def _missing(module: str) -> bool:
    try:
        importlib.import_module(module)
    except ImportError:
        return True
    return False


@contextlib.contextmanager
def installed(checkout: Path) -> Iterator[list[str]]:
    """Put ``checkout`` first on ``sys.path``, install the shims and yield the names of those
    that applied; on exit, restore everything and forget the imported ``datafree`` package."""
    checkout = Path(checkout).resolve()
    patches = _Patches()
    added_modules: list[str] = []
    saved_path = list(sys.path)
    before = set(sys.modules)
    try:
        if _missing("termcolor"):  # their logger's colours; the harness never logs through it
            stub = types.ModuleType("termcolor")
            stub.colored = lambda text, *args, **kwargs: text
            sys.modules["termcolor"] = stub
            added_modules.append("termcolor")
            patches.applied.append("termcolor")
        if _missing("torchvision.models.utils"):  # removed in torchvision 0.13; torch.hub has the same function
            stub = types.ModuleType("torchvision.models.utils")
            stub.load_state_dict_from_url = torch.hub.load_state_dict_from_url
            sys.modules["torchvision.models.utils"] = stub
            added_modules.append("torchvision.models.utils")
            patches.applied.append("torchvision.models.utils")
        if _missing("xlsxwriter"):  # NAYER's fast_meta.py imports it for spreadsheets the harness never writes
            sys.modules["xlsxwriter"] = types.ModuleType("xlsxwriter")
            added_modules.append("xlsxwriter")
            patches.applied.append("xlsxwriter")
        # unconditional .cuda() calls (Fast-Datafree's generator clone, meta-gradients, NAYER's generator
        # re-initialization, the targets of AdaDFKD's MoCo queue loss, _utils.py:781): the protocol runs on CPU
        patches.set(torch.Tensor, "cuda", lambda self, *args, **kwargs: self, "cuda-noop")
        patches.set(nn.Module, "cuda", lambda self, *args, **kwargs: self, "cuda-noop")
        patches.set(torch.utils.data, "DataLoader", _SerialDataLoader, "dataloader-workers-0")
        sys.path.insert(0, str(checkout))
        importlib.import_module("datafree")
        utils_mod = sys.modules.get("datafree.utils._utils")
        if utils_mod is not None and hasattr(utils_mod, "Image"):
            patches.set(utils_mod, "Image", _PILFor1Channel(utils_mod.Image), "png-1-channel")
        _install_cpnet(patches, checkout)
        di_mod = sys.modules.get("datafree.synthesis.deepinversion")
        if di_mod is not None and hasattr(di_mod, "clip_images"):
            patches.set(di_mod, "clip_images", _clip_images, "clip-images-any-channels")
        yield patches.applied
    finally:
        patches.undo()
        sys.path[:] = saved_path
        for name in set(sys.modules) - before:
            if name == "datafree" or name.startswith("datafree.") or name in added_modules:
                del sys.modules[name]
