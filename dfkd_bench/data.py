"""Datasets: shape, normalization and the real splits, held as uint8 tensors in memory.

Only teacher training and baselines read the train split; only the runner's evaluation
reads the test split. Synthesizers run inside :func:`sealed`, where any read raises.
"""

from __future__ import annotations

import contextlib
import gzip
import os
import pickle
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch

from .errors import DataAccessError, DfkdError
from .registry import DATASETS

DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")


def data_root() -> Path:
    """Where datasets are read from and downloaded to: ``$DFKD_BENCH_DATA`` or ``./data``."""
    return Path(os.environ.get("DFKD_BENCH_DATA", "data"))


@dataclass(frozen=True)
class DatasetSpec:
    """What the runner and methods may know about a dataset: its shape and normalization.

    ``mean``/``std`` (per channel, for pixels in [0, 1]) are the normalization a teacher trained here
    uses by default; a run uses its teacher's, recorded in the teacher's sidecar
    (:func:`dfkd_bench.teachers.teacher_normalization`)."""

    name: str
    num_classes: int
    channels: int
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    loader: Callable[[str, Path], tuple[torch.Tensor, torch.Tensor]]
    class_names: tuple[str, ...] = ()  # in label order; empty when unknown (NAYER embeds them as text)
    names_loader: Callable[[], tuple[str, ...]] | None = None  # names read from the data when it is there

    def names(self) -> tuple[str, ...]:
        """The class names in label order: the fixed ones, else those the data folder holds, else ()."""
        return self.class_names or (self.names_loader() if self.names_loader else ())

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return (self.channels, self.image_size, self.image_size)

    def load(self, split: str, root: Path | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Images ``(N, C, H, W)`` uint8 and labels ``(N,)`` int64 of ``split`` ('train' or 'test')."""
        if _sealed_depth:
            raise DataAccessError(f"real data ({self.name}/{split}) was requested inside a synthesizer")
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        return self.loader(split, Path(root) if root else data_root())


def get_dataset(name: str) -> DatasetSpec:
    return DATASETS.get(name)


_sealed_depth = 0


@contextlib.contextmanager
def sealed() -> Iterator[None]:
    """No real data may be loaded inside this block (the runner wraps every method call in it)."""
    global _sealed_depth
    _sealed_depth += 1
    try:
        yield
    finally:
        _sealed_depth -= 1


# ---------------------------------------------------------------- Fashion-MNIST (IDX files)

def read_idx(path: Path) -> torch.Tensor:
    """Read an IDX file (optionally gzipped) into a uint8 tensor."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as fh:
            raw = fh.read()
    except (OSError, EOFError) as exc:
        raise DfkdError(f"cannot read {path}: {exc}") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise DfkdError(f"{path} is not an IDX file of unsigned bytes")
    ndim = raw[3]
    if len(raw) < 4 + 4 * ndim:
        raise DfkdError(f"{path} is truncated or corrupt: its header is cut short")
    dims = struct.unpack(f">{ndim}I", raw[4:4 + 4 * ndim])
    body = raw[4 + 4 * ndim:]
    expected = 1
    for d in dims:
        expected *= d
    if len(body) != expected:
        raise DfkdError(f"{path} is truncated or corrupt: {len(body)} bytes of data, expected {expected}")
    return torch.frombuffer(bytearray(body), dtype=torch.uint8).reshape(dims)


_FMNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def _find_idx(folder: Path, stem: str) -> Path | None:
    for name in (stem + ".gz", stem):
        if (folder / name).is_file():
            return folder / name
    return None


def _load_fashion_mnist(split: str, root: Path) -> tuple[torch.Tensor, torch.Tensor]:
    candidates = [DEBIAN_FASHION_MNIST, root / "fashion-mnist", root / "FashionMNIST" / "raw"]
    img_stem, lbl_stem = _FMNIST_FILES[split]
    for folder in candidates:
        img, lbl = _find_idx(folder, img_stem), _find_idx(folder, lbl_stem)
        if img and lbl:
            images, labels = read_idx(img), read_idx(lbl)
            if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
                raise DfkdError(f"Fashion-MNIST files in {folder} do not match: "
                                f"{tuple(images.shape)} images, {tuple(labels.shape)} labels")
            return images.unsqueeze(1).contiguous(), labels.long()
    try:
        from torchvision.datasets import FashionMNIST

        ds = FashionMNIST(str(root), train=(split == "train"), download=True)
    except Exception as exc:  # offline: urllib/ssl/OSError, whatever torchvision raises
        raise DfkdError(
            f"Fashion-MNIST not found and download failed ({type(exc).__name__}); install Debian's "
            f"dataset-fashion-mnist or put {img_stem}.gz and {lbl_stem}.gz in {root / 'fashion-mnist'}"
        ) from None
    return ds.data.unsqueeze(1).contiguous(), ds.targets.long()


# ---------------------------------------------------------------- CIFAR (the python-version batches)

@dataclass(frozen=True)
class _CifarLayout:
    """torchvision's on-disk layout of a CIFAR dataset, as the archive extracts it."""

    folder: str
    splits: dict[str, tuple[str, ...]]
    label_key: str
    archive: str
    torchvision_class: str


_CIFAR10 = _CifarLayout("cifar-10-batches-py",
                        {"train": tuple(f"data_batch_{i}" for i in range(1, 6)), "test": ("test_batch",)},
                        "labels", "cifar-10-python.tar.gz", "CIFAR10")
_CIFAR100 = _CifarLayout("cifar-100-python", {"train": ("train",), "test": ("test",)}, "fine_labels",
                         "cifar-100-python.tar.gz", "CIFAR100")


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles numpy arrays, lists, dicts and strings, and refuses anything that would run other code."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")}

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"it references {module}.{name}")
        return super().find_class(module, name)


def read_cifar_batch(path: Path, label_key: str) -> tuple[torch.Tensor, torch.Tensor]:
    """One CIFAR batch file -> images ``(N, 3, 32, 32)`` uint8 and labels ``(N,)`` int64."""
    import numpy as np

    try:
        with open(path, "rb") as fh:
            entry = _ArrayUnpickler(fh, encoding="latin1").load()
        data, labels = np.asarray(entry["data"]), entry[label_key]
    except Exception as exc:  # pickle, EOF, key and type errors of a torn or foreign file
        raise DfkdError(f"{path} is not a CIFAR batch file ({type(exc).__name__}: {exc})") from None
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(labels) != len(data):
        raise DfkdError(f"{path} is not a CIFAR batch file: data {data.dtype} {data.shape}, {len(labels)} labels")
    images = torch.from_numpy(data.copy()).view(-1, 3, 32, 32)
    return images, torch.tensor(labels, dtype=torch.long)


def _cifar_loader(layout: _CifarLayout, num_classes: int) -> Callable[[str, Path], tuple[torch.Tensor, torch.Tensor]]:
    def load(split: str, root: Path) -> tuple[torch.Tensor, torch.Tensor]:
        folder = root / layout.folder
        files = [folder / name for name in layout.splits[split]]
        if not all(f.is_file() for f in files):
            _download_cifar(layout, root)
        # Read directly rather than through torchvision's class, which also checks each file's MD5:
        # any copy in this layout is accepted, its content checked below and by read_cifar_batch.
        parts = [read_cifar_batch(f, layout.label_key) for f in files]
        images, labels = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
        if len(labels) and (labels.min().item() < 0 or labels.max().item() >= num_classes):
            raise DfkdError(f"{folder} holds labels outside 0..{num_classes - 1}: not {layout.torchvision_class}")
        return images, labels

    return load


def _download_cifar(layout: _CifarLayout, root: Path) -> None:
    """Fetch and extract the archive with torchvision (which checks its MD5), or say what to provide."""
    try:
        import torchvision.datasets as tvd

        getattr(tvd, layout.torchvision_class)(str(root), train=True, download=True)
    except Exception as exc:  # offline: urllib/ssl/OSError, whatever torchvision raises
        wanted = ", ".join(sorted({n for names in layout.splits.values() for n in names}))
        archive = root / layout.archive
        # torchvision only uses an archive whose MD5 it knows; a present one failed that check
        what = (f"{archive} does not match torchvision's MD5 and download failed ({type(exc).__name__}); replace it"
                if archive.is_file() else
                f"{layout.torchvision_class} not found in {root / layout.folder} and download failed "
                f"({type(exc).__name__}); put {layout.archive} in {root}")
        raise DfkdError(f"{what}, or its extracted folder {layout.folder}/ ({wanted}) there; the data root is "
                        "$DFKD_BENCH_DATA or ./data") from None


# ---------------------------------------------------------------- Tiny-ImageNet (the cs231n folder layout)

TINY_IMAGENET = "tiny-imagenet-200"
TINY_IMAGENET_URL = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"


def _tiny_imagenet_files(folder: Path, split: str) -> tuple[list[tuple[Path, int]], tuple[str, ...]]:
    """(image path, label) in the authors' order and the class names: classes are the sorted wnids of
    ``wnids.txt``; train reads ``train/<wnid>/images/*``, test reads ``val/images/*`` labelled by
    ``val/val_annotations.txt``, each sorted by file name (NAYER datafree/datasets/tiny_imagenet.py:77-112)."""
    wnids = sorted(line.strip() for line in (folder / "wnids.txt").read_text().splitlines() if line.strip())
    index = {w: i for i, w in enumerate(wnids)}
    words = {}
    if (folder / "words.txt").is_file():
        for line in (folder / "words.txt").read_text().splitlines():
            wnid, _, text = line.partition("\t")
            words[wnid] = text.split(",")[0].strip()
    names = tuple(words.get(w, w) for w in wnids)
    files: list[tuple[Path, int]] = []
    if split == "train":
        for wnid in wnids:
            images = folder / "train" / wnid / "images"
            if not images.is_dir():
                raise DfkdError(f"Tiny-ImageNet in {folder} is incomplete: no {images}")
            files += [(p, index[wnid]) for p in sorted(images.iterdir()) if p.is_file()]
    else:
        annotations = folder / "val" / "val_annotations.txt"
        if not annotations.is_file():
            raise DfkdError(f"Tiny-ImageNet in {folder} is incomplete: no {annotations}")
        label_of = {}
        for line in annotations.read_text().splitlines():
            parts = line.split("\t")
            if len(parts) >= 2:
                if parts[1] not in index:
                    raise DfkdError(f"{annotations} names class {parts[1]}, which {folder / 'wnids.txt'} lacks")
                label_of[parts[0]] = index[parts[1]]
        for p in sorted((folder / "val" / "images").iterdir()):
            if p.name not in label_of:
                raise DfkdError(f"{annotations} has no class for {p.name}")
            files.append((p, label_of[p.name]))
    return files, names


def _load_tiny_imagenet(split: str, root: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """Tiny-ImageNet's train (100k) or val (10k, the test split here) images as uint8 (N, 3, 64, 64); the
    decoded split is cached beside the images (``dfkd-<split>.pt``) so later runs skip the JPEG decoding."""
    import numpy as np
    from PIL import Image, UnidentifiedImageError

    from .runtime import atomic_torch_save, safe_load

    folder = root / TINY_IMAGENET
    if not (folder / "wnids.txt").is_file():
        raise DfkdError(f"Tiny-ImageNet not found: unzip {TINY_IMAGENET_URL} so that {folder / 'wnids.txt'} exists "
                        "(the data root is ./data or $DFKD_BENCH_DATA)")
    files, _ = _tiny_imagenet_files(folder, split)
    cache = folder / f"dfkd-{split}.pt"
    if cache.is_file():
        data = safe_load(cache, "Tiny-ImageNet cache (delete it to decode the images again)")
        if isinstance(data, dict) and len(data.get("labels", ())) == len(files):
            return data["images"], data["labels"]
    images = torch.empty(len(files), 3, 64, 64, dtype=torch.uint8)
    for i, (path, _) in enumerate(files):
        try:
            with Image.open(path) as img:  # some of its JPEGs are grayscale: every image as RGB
                pixels = np.array(img.convert("RGB"))  # a writable copy
        except (OSError, UnidentifiedImageError) as exc:
            raise DfkdError(f"cannot decode {path}: {str(exc).splitlines()[0][:120]}") from None
        if pixels.shape != (64, 64, 3):
            raise DfkdError(f"{path} is {pixels.shape[1]}x{pixels.shape[0]} pixels; Tiny-ImageNet images are 64x64")
        images[i] = torch.from_numpy(pixels).permute(2, 0, 1)
    labels = torch.tensor([label for _, label in files], dtype=torch.long)
    try:
        atomic_torch_save(cache, {"images": images, "labels": labels})
    except DfkdError:
        pass  # a read-only data folder: decode again next time
    return images, labels


def _tiny_imagenet_names() -> tuple[str, ...]:
    """The class names when the data is present (NAYER's text embeddings need them), else none."""
    folder = data_root() / TINY_IMAGENET
    try:
        return _tiny_imagenet_files(folder, "test")[1] if (folder / "wnids.txt").is_file() else ()
    except (DfkdError, OSError):
        return ()


def _register(spec: DatasetSpec) -> None:
    DATASETS.register(spec, name=spec.name)


FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
                         "Bag", "Ankle boot")
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
CIFAR100_CLASSES = tuple("""
    apple aquarium_fish baby bear beaver bed bee beetle bicycle bottle bowl boy bridge bus butterfly camel can
    castle caterpillar cattle chair chimpanzee clock cloud cockroach couch crab crocodile cup dinosaur dolphin
    elephant flatfish forest fox girl hamster house kangaroo keyboard lamp lawn_mower leopard lion lizard lobster
    man maple_tree motorcycle mountain mouse mushroom oak_tree orange orchid otter palm_tree pear pickup_truck
    pine_tree plain plate poppy porcupine possum rabbit raccoon ray road rocket rose sea seal shark shrew skunk
    skyscraper snail snake spider squirrel streetcar sunflower sweet_pepper table tank telephone television tiger
    tractor train trout tulip turtle wardrobe whale willow_tree wolf woman worm""".split())

_register(DatasetSpec("fashion-mnist", 10, 1, 28, (0.2860,), (0.3530,), _load_fashion_mnist, FASHION_MNIST_CLASSES))
# CIFAR: the normalization under which the released teachers (CMI's cifar10_resnet34.pth, ...) were trained
# and under which CMI, Fast, CSD, NAYER and their forks evaluate and invert them (zju-vipa/CMI registry.py:17-20,
# NORMALIZE_DICT). Its CIFAR-10 std is not the dataset's pixel std (0.2470, 0.2435, 0.2616): the field's
# teachers expect this one, so every CIFAR teacher trained here uses it too and stays interchangeable with them.
_register(DatasetSpec("cifar10", 10, 3, 32, (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010),
                      _cifar_loader(_CIFAR10, 10), CIFAR10_CLASSES))
_register(DatasetSpec("cifar100", 100, 3, 32, (0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761),
                      _cifar_loader(_CIFAR100, 100), CIFAR100_CLASSES))
# Tiny-ImageNet: 64 px, 200 classes; the val split is the test set (the test split has no labels). Normalized
# as the reference code's `tiny_imagenet` entry does, mean 0.5 and std 0.5 per channel (zju-vipa/CMI
# registry.py:31 and 320-334; NAYER registry.py:32 and 308), not with ImageNet's statistics.
_register(DatasetSpec("tiny-imagenet", 200, 3, 64, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), _load_tiny_imagenet,
                      names_loader=_tiny_imagenet_names))


# ---------------------------------------------------------------- shared helpers

class Normalizer(torch.nn.Module):
    """[0, 1] pixels -> the dataset's normalized space, and back."""

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]):
        super().__init__()
        self.values = {"mean": [float(m) for m in mean], "std": [float(s) for s in std]}  # as recorded
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std

    def inverse(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.std + self.mean


def to_unit(images: torch.Tensor) -> torch.Tensor:
    """uint8 images -> float in [0, 1]."""
    return images.float().div_(255.0)


@torch.no_grad()
def evaluate(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, normalizer: Normalizer,
             device: torch.device, batch_size: int = 512) -> float:
    """Top-1 accuracy in percent of ``model`` on uint8 ``images``."""
    was_training = model.training
    model.eval()
    correct = 0
    for start in range(0, len(images), batch_size):
        x = normalizer(to_unit(images[start:start + batch_size].to(device)))
        y = labels[start:start + batch_size].to(device)
        with torch.autocast(device.type, enabled=device.type == "cuda"):
            correct += (model(x).argmax(1) == y).sum().item()
    model.train(was_training)
    return 100.0 * correct / max(1, len(images))
