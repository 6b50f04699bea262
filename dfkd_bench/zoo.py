"""Teacher/student zoo: the small-image networks DFKD papers use, registered into timm.

Every model here is built by ``timm.create_model(name, num_classes=..., in_chans=...)``
and exposes timm's feature API, which is all a method may rely on:

* ``forward_features(x)`` -> the last convolutional feature map ``(B, C, h, w)``
* ``forward_head(f, pre_logits=True)`` -> globally pooled features ``(B, num_features)``
* ``forward_head(f)`` -> logits

``--teacher resnet34`` on a small-image dataset resolves to ``cifar_resnet34`` (3x3
stride-1 stem, no max-pool); ``timm:resnet34`` always means timm's ImageNet model.
"""

from __future__ import annotations

import difflib

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models import register_model

from .errors import DfkdError, UnknownNameError

SMALL_IMAGE_MAX = 64  # datasets up to this many pixels a side get the small-image variants

# Plain names that mean the small-image variant on small images.
SMALL_IMAGE_ALIASES = {
    "resnet18": "cifar_resnet18",
    "resnet34": "cifar_resnet34",
    "vgg8": "cifar_vgg8_bn",
    "vgg8_bn": "cifar_vgg8_bn",
    "vgg11": "cifar_vgg11_bn",
    "vgg11_bn": "cifar_vgg11_bn",
}
EXPLICIT_TIMM_PREFIX = "timm:"

# A run without --student takes its teacher's student from the pairs of the authors' CIFAR scripts
# (CMI, Fast, CSD): ResNet-34 and VGG-11 -> ResNet-18, WRN-40-2 -> WRN-16-1 (their WRN-40-1 and
# WRN-16-2 students are one --student away). WRN-16-2 -> WRN-16-1 is this project's Fashion-MNIST
# pair (the shipped teacher), a narrower WRN-40-2 -> WRN-16-1.
PAPER_STUDENTS = {"resnet34": "resnet18", "vgg11": "resnet18", "wrn40_2": "wrn16_1", "wrn16_2": "wrn16_1"}
DEFAULT_STUDENT = "wrn16_1"  # for a teacher no paper pairs


class _SmallImageNet(nn.Module):
    """The part of timm's model interface the zoo's networks share."""

    num_features: int
    num_classes: int
    fc: nn.Module

    def _init_head(self, num_features: int, num_classes: int) -> None:
        self.num_features = num_features
        self.num_classes = num_classes
        self.global_pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(num_features, num_classes) if num_classes > 0 else nn.Identity()
        self.pretrained_cfg = {"num_classes": num_classes, "classifier": "fc"}

    def get_classifier(self) -> nn.Module:
        return self.fc

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        self.num_classes = num_classes
        self.fc = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.global_pool(x).flatten(1)
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)


# ---------------------------------------------------------------- ResNet (small-image stem)

class _BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class SmallImageResNet(_SmallImageNet):
    """ResNet with a 3x3 stride-1 stem and no max-pool, as in DFKD papers' CIFAR code."""

    def __init__(self, blocks: tuple[int, ...], num_classes: int = 10, in_chans: int = 3):
        super().__init__()
        self.conv1 = nn.Conv2d(in_chans, 64, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        stages, cin = [], 64
        for i, n in enumerate(blocks):
            cout = 64 * 2**i
            layers = []
            for j in range(n):
                layers.append(_BasicBlock(cin, cout, stride=2 if (i > 0 and j == 0) else 1))
                cin = cout
            stages.append(nn.Sequential(*layers))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self._init_head(cin, num_classes)
        self._init_weights()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))


# ---------------------------------------------------------------- Wide ResNet

class _WideBlock(nn.Module):
    """Pre-activation block: BN-ReLU-conv, BN-ReLU-conv, with a 1x1 projection when shapes change."""

    def __init__(self, cin: int, cout: int, stride: int, drop_rate: float):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.drop_rate = drop_rate
        self.project = nn.Conv2d(cin, cout, 1, stride, bias=False) if (cin != cout or stride != 1) else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = F.relu(self.bn1(x))
        shortcut = x if self.project is None else self.project(pre)
        out = self.conv1(pre)
        out = F.relu(self.bn2(out))
        if self.drop_rate > 0:
            out = F.dropout(out, p=self.drop_rate, training=self.training)
        return self.conv2(out) + shortcut


class WideResNet(_SmallImageNet):
    """WRN-depth-k (Zagoruyko & Komodakis) for small images: three groups, widths 16k/32k/64k."""

    def __init__(self, depth: int, widen: int, num_classes: int = 10, in_chans: int = 3, drop_rate: float = 0.0):
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError(f"WRN depth must be 6n+4, got {depth}")
        n = (depth - 4) // 6
        widths = [16, 16 * widen, 32 * widen, 64 * widen]
        self.conv1 = nn.Conv2d(in_chans, widths[0], 3, 1, 1, bias=False)
        groups, cin = [], widths[0]
        for g, cout in enumerate(widths[1:]):
            blocks = [_WideBlock(cin if i == 0 else cout, cout, (1 if g == 0 else 2) if i == 0 else 1, drop_rate)
                      for i in range(n)]
            groups.append(nn.Sequential(*blocks))
            cin = cout
        self.block1, self.block2, self.block3 = groups
        self.bn_final = nn.BatchNorm2d(cin)
        self._init_head(cin, num_classes)
        self._init_weights()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block3(self.block2(self.block1(self.conv1(x))))
        return F.relu(self.bn_final(x))


# ---------------------------------------------------------------- VGG with BN

class SmallImageVGG(_SmallImageNet):
    """VGG-BN for small images: five conv stages, max-pool after the first four."""

    def __init__(self, stages: tuple[tuple[int, ...], ...], num_classes: int = 10, in_chans: int = 3):
        super().__init__()
        layers: list[nn.Module] = []
        cin = in_chans
        for i, widths in enumerate(stages):
            for w in widths:
                layers += [nn.Conv2d(cin, w, 3, 1, 1), nn.BatchNorm2d(w), nn.ReLU(inplace=True)]
                cin = w
            if i < len(stages) - 1:
                # ceil_mode keeps odd sizes (28 -> 14 -> 7 -> 4 -> 2) from vanishing
                layers.append(nn.MaxPool2d(2, ceil_mode=True))
        self.features = nn.Sequential(*layers)
        self._init_head(cin, num_classes)
        self._init_weights()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)


# ---------------------------------------------------------------- timm registration

def _build(cls, *args, **kwargs) -> nn.Module:
    kwargs.pop("pretrained", None)
    for key in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"):
        kwargs.pop(key, None)
    if kwargs.pop("device", None) not in (None, "cpu") or kwargs.pop("dtype", None) is not None:
        raise ValueError("small-image zoo models are built on CPU in float32; move them afterwards")
    return cls(*args, **kwargs)


@register_model
def cifar_resnet18(pretrained: bool = False, **kwargs) -> nn.Module:
    """ResNet-18, 3x3 stride-1 stem, no max-pool."""
    return _build(SmallImageResNet, (2, 2, 2, 2), **kwargs)


@register_model
def cifar_resnet34(pretrained: bool = False, **kwargs) -> nn.Module:
    """ResNet-34, 3x3 stride-1 stem, no max-pool."""
    return _build(SmallImageResNet, (3, 4, 6, 3), **kwargs)


@register_model
def wrn16_1(pretrained: bool = False, **kwargs) -> nn.Module:
    """Wide ResNet 16-1."""
    return _build(WideResNet, 16, 1, **kwargs)


@register_model
def wrn16_2(pretrained: bool = False, **kwargs) -> nn.Module:
    """Wide ResNet 16-2."""
    return _build(WideResNet, 16, 2, **kwargs)


@register_model
def wrn40_1(pretrained: bool = False, **kwargs) -> nn.Module:
    """Wide ResNet 40-1."""
    return _build(WideResNet, 40, 1, **kwargs)


@register_model
def wrn40_2(pretrained: bool = False, **kwargs) -> nn.Module:
    """Wide ResNet 40-2."""
    return _build(WideResNet, 40, 2, **kwargs)


@register_model
def cifar_vgg8_bn(pretrained: bool = False, **kwargs) -> nn.Module:
    """VGG-8 with BatchNorm."""
    return _build(SmallImageVGG, ((64,), (128,), (256,), (512,), (512,)), **kwargs)


@register_model
def cifar_vgg11_bn(pretrained: bool = False, **kwargs) -> nn.Module:
    """VGG-11 with BatchNorm."""
    return _build(SmallImageVGG, ((64,), (128,), (256, 256), (512, 512), (512, 512)), **kwargs)


ZOO = ("cifar_resnet18", "cifar_resnet34", "wrn16_1", "wrn16_2", "wrn40_1", "wrn40_2",
       "cifar_vgg8_bn", "cifar_vgg11_bn")


def resolve_model_name(name: str, image_size: int) -> str:
    """Map a user's model name to the timm name to build for images of ``image_size`` pixels."""
    if name.startswith(EXPLICIT_TIMM_PREFIX):
        resolved = name[len(EXPLICIT_TIMM_PREFIX):]
    elif image_size <= SMALL_IMAGE_MAX and name in SMALL_IMAGE_ALIASES:
        resolved = SMALL_IMAGE_ALIASES[name]
    else:
        resolved = name
    if not timm.is_model(resolved):
        choices = list(ZOO) + list(SMALL_IMAGE_ALIASES)
        candidates = list(dict.fromkeys(choices + timm.list_models()))
        close = difflib.get_close_matches(resolved, candidates, n=3, cutoff=0.6)
        hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        raise UnknownNameError(f"unknown model '{name}'{hint} (the zoo: {', '.join(ZOO)}; "
                               "or any name from timm.list_models())")
    return resolved


def paper_student(teacher: str) -> str | None:
    """The student the papers pair with ``teacher`` (``resnet34`` or ``cifar_resnet34`` -> ``resnet18``), or None."""
    teacher = teacher.partition("@")[0]  # a teacher variant (wrn16_2@s1) pairs as its architecture
    small = SMALL_IMAGE_ALIASES.get(teacher, teacher)
    for paper_teacher, student in PAPER_STUDENTS.items():
        if SMALL_IMAGE_ALIASES.get(paper_teacher, paper_teacher) == small:
            return student
    return None


def create_model(name: str, num_classes: int, in_chans: int, image_size: int) -> nn.Module:
    """Build ``name`` (zoo or timm) for this dataset's shape and check it accepts that shape."""
    resolved = resolve_model_name(name, image_size)
    kwargs: dict = {"num_classes": num_classes, "in_chans": in_chans}
    try:
        model = timm.create_model(resolved, pretrained=False, **kwargs)
    except TypeError:
        # some timm families fix the input size at construction; tell them ours
        model = timm.create_model(resolved, pretrained=False, img_size=image_size, **kwargs)
    check_model_input(model, name, in_chans, image_size, num_classes)
    model.dfkd_name = resolved  # type: ignore[attr-defined]
    return model


def check_model_input(model: nn.Module, name: str, in_chans: int, image_size: int, num_classes: int) -> None:
    """Raise a one-line error if the model cannot take ``(in_chans, image_size, image_size)`` images."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            x = torch.zeros(2, in_chans, image_size, image_size)
            feats = model.forward_features(x)
            logits = model.forward_head(feats)
    except (RuntimeError, ValueError, AssertionError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DfkdError(f"model '{name}' cannot take {in_chans}x{image_size}x{image_size} images: {first}") from None
    finally:
        model.train(was_training)
    if tuple(logits.shape) != (2, num_classes):
        raise DfkdError(f"model '{name}' returned logits of shape {tuple(logits.shape)}, "
                        f"expected (2, {num_classes})")


def stage_modules(model: nn.Module) -> list[nn.Module]:
    """The modules whose outputs are the network's stages, shallow to deep.

    For the zoo: a WRN's three block groups (the last one's output comes *before* the final
    BN-ReLU, as in the reference code's ``return_features``), a ResNet's four layers, and for a
    VGG the ReLU that ends each resolution. Other timm models: the modules named by their
    ``feature_info``. Hooks on these modules give feature-based losses (attention transfer,
    CSD's feature alignment) their maps without a second forward pass.
    """
    if isinstance(model, WideResNet):
        return [model.block1, model.block2, model.block3]
    if isinstance(model, SmallImageResNet):
        return [model.layer1, model.layer2, model.layer3, model.layer4]
    if isinstance(model, SmallImageVGG):
        layers = list(model.features)
        ends = [layers[i - 1] for i, m in enumerate(layers) if isinstance(m, nn.MaxPool2d)]
        return ends + [layers[-1]]
    info = getattr(model, "feature_info", None)
    if info:
        names = [f["module"] for f in (info.get_dicts() if hasattr(info, "get_dicts") else info)]
        return [model.get_submodule(name) for name in names]
    raise DfkdError(f"{type(model).__name__} names no stages (no feature_info); "
                    "a loss on intermediate feature maps cannot use it")


def feature_dims(model: nn.Module, in_chans: int, image_size: int) -> tuple[tuple[int, ...], int]:
    """Shape of ``forward_features`` (without batch) and width of the pooled pre-logits."""
    was_training = model.training
    model.eval()
    with torch.no_grad():
        p = next(model.parameters())
        f = model.forward_features(torch.zeros(2, in_chans, image_size, image_size, device=p.device, dtype=p.dtype))
        pooled = model.forward_head(f, pre_logits=True)
    model.train(was_training)
    return tuple(f.shape[1:]), pooled.shape[1]
