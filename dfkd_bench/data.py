"""Datasets: shape, normalization and the real splits as uint8 images.

The small datasets (Fashion-MNIST, CIFAR, Tiny-ImageNet) are held in memory as one tensor per split;
class-folder datasets (ImageNet, or any folder a user declares with ``dfkd-bench dataset add``) are
read lazily, batch by batch, through a DataLoader with workers. :meth:`DatasetSpec.split` gives either
kind as an :class:`ImageSplit`; :meth:`DatasetSpec.load` gives in-memory tensors (decoding a folder
split when it fits in memory).

Only teacher training and baselines read the train split; only the runner's evaluation
reads the test split. Synthesizers run inside :func:`sealed`, where any read raises.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import math
import os
import pickle
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch

from .errors import DataAccessError, DfkdError, UnknownNameError
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
    loader: Callable[[str, Path], tuple[torch.Tensor, torch.Tensor]] | None  # None for folder datasets
    class_names: tuple[str, ...] = ()  # in label order; empty when unknown (NAYER embeds them as text)
    names_loader: Callable[[], tuple[str, ...]] | None = None  # names read from the data when it is there
    folder: "ClassFolders | None" = None  # set for datasets read lazily from class folders (then loader is unused)

    def names(self) -> tuple[str, ...]:
        """The class names in label order: the fixed ones, else those the data folder holds, else ()."""
        return self.class_names or (self.names_loader() if self.names_loader else ())

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return (self.channels, self.image_size, self.image_size)

    def load(self, split: str, root: Path | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Images ``(N, C, H, W)`` uint8 and labels ``(N,)`` int64 of ``split`` ('train' or 'test'), in memory.

        A class-folder dataset is decoded whole (its evaluation transform: resize and center crop).

        Raises:
            DataAccessError: called inside :func:`sealed`.
            DfkdError: the data is missing, corrupt, or (a folder dataset) too large to hold in memory.
        """
        found = self.split(split, root)
        return found.to_tensors(f"{self.name}/{split}")

    def split(self, split: str, root: Path | None = None, train: bool = False) -> "ImageSplit":
        """``split`` ('train' or 'test') as an :class:`ImageSplit`: a tensor pair for the in-memory datasets,
        a lazily read folder for the others. ``train``: a folder dataset applies its training augmentation
        (random resized crop and flip) as it reads; in-memory splits are augmented by the caller.

        Raises:
            DataAccessError: called inside :func:`sealed`.
            DfkdError: the data is missing or corrupt.
        """
        if _sealed_depth:
            raise DataAccessError(f"real data ({self.name}/{split}) was requested inside a synthesizer")
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        root = Path(root) if root else data_root()
        if self.folder is not None:
            return self.folder.open(self, split, root, train)
        return TensorSplit(*self.loader(split, root))

    @property
    def lazy(self) -> bool:
        """True when the splits are read from image folders batch by batch instead of held in memory."""
        return self.folder is not None


def get_dataset(name: str) -> DatasetSpec:
    """The registered dataset ``name``, or one declared with ``dfkd-bench dataset add`` (a JSON file under
    ``<data root>/datasets/``).

    Raises:
        UnknownNameError: neither exists (the message lists the known names).
    """
    try:
        return DATASETS.get(name)
    except UnknownNameError:
        declared = declared_dataset(name)
        if declared is None:
            raise
        return declared


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


# ---------------------------------------------------------------- splits: in memory or read from folders

class ImageSplit:
    """One labelled split as batches of uint8 images ``(B, C, H, W)`` and int64 labels ``(B,)``."""

    def __len__(self) -> int:
        raise NotImplementedError

    def batches(self, batch_size: int, rank: int = 0, world: int = 1, *,
                generator: torch.Generator | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Every ``world``-th example from ``rank`` (one rank's shard; all of them by default), in file
        order, or shuffled by ``generator``."""
        raise NotImplementedError

    def to_tensors(self, what: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The whole split in memory: images ``(N, C, H, W)`` uint8, labels ``(N,)`` int64."""
        raise NotImplementedError


class TensorSplit(ImageSplit):
    """A split held in memory (the small datasets)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor):
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.labels)

    def batches(self, batch_size: int, rank: int = 0, world: int = 1, *,
                generator: torch.Generator | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        images, labels = self.images[rank::world], self.labels[rank::world]
        if generator is not None:
            order = torch.randperm(len(labels), generator=generator)
            images, labels = images[order], labels[order]
        for start in range(0, len(labels), batch_size):
            yield images[start:start + batch_size], labels[start:start + batch_size]

    def to_tensors(self, what: str) -> tuple[torch.Tensor, torch.Tensor]:
        return self.images, self.labels


def data_workers() -> int:
    """DataLoader worker processes for folder datasets: ``$DFKD_BENCH_WORKERS``, else up to 8 (one per core)."""
    raw = os.environ.get("DFKD_BENCH_WORKERS", "")
    if raw.strip():
        try:
            return max(0, int(raw))
        except ValueError:
            raise DfkdError(f"DFKD_BENCH_WORKERS must be a whole number, got {raw!r}") from None
    return min(8, os.cpu_count() or 1)


def _open_gray(path: str):
    from PIL import Image

    with open(path, "rb") as fh:
        return Image.open(fh).convert("L")


class FolderSplit(ImageSplit):
    """A split read lazily from ``<root>/<class>/<image>`` folders (torchvision's ``ImageFolder``: classes are
    the sorted folder names, images sorted within each), decoded by DataLoader workers.

    Evaluation transform: resize the shorter side to ``resize``, center crop ``image_size``. Training
    transform (``train``): random resized crop to ``image_size`` (scale 0.08-1) and horizontal flip, the
    standard ImageNet recipe (torchvision references/classification/presets.py)."""

    def __init__(self, folder: Path, image_size: int, resize: int, channels: int, train: bool):
        import torchvision.transforms as T
        from torchvision.datasets import ImageFolder
        from torchvision.datasets.folder import pil_loader  # PIL, as RGB

        steps = ([T.RandomResizedCrop(image_size), T.RandomHorizontalFlip()] if train else
                 [T.Resize(resize), T.CenterCrop(image_size)])
        try:
            # allow_empty: a class folder without images keeps its label index (the classes are the folders)
            self.dataset = ImageFolder(str(folder), transform=T.Compose([*steps, T.PILToTensor()]),
                                       loader=_open_gray if channels == 1 else pil_loader, allow_empty=True)
        except (FileNotFoundError, OSError) as exc:
            raise DfkdError(f"cannot read the class folders in {folder}: {str(exc).splitlines()[0]}") from None
        self.folder = folder

    @property
    def classes(self) -> list[str]:
        return self.dataset.classes

    def __len__(self) -> int:
        return len(self.dataset)

    def batches(self, batch_size: int, rank: int = 0, world: int = 1, *,
                generator: torch.Generator | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        from torch.utils.data import DataLoader, Subset

        indices = list(range(rank, len(self.dataset), world))
        if generator is not None:
            indices = [indices[i] for i in torch.randperm(len(indices), generator=generator).tolist()]
        workers = data_workers()
        loader = DataLoader(Subset(self.dataset, indices), batch_size=batch_size, num_workers=workers,
                            generator=generator, persistent_workers=False, pin_memory=False)
        try:
            for images, labels in loader:
                yield images, labels.long()
        except OSError as exc:  # a corrupt or unreadable image (PIL's errors are OSErrors, in workers too)
            last = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
            raise DfkdError(f"cannot read an image under {self.folder}: {last[:160]}") from None

    def to_tensors(self, what: str) -> tuple[torch.Tensor, torch.Tensor]:
        first, _ = self.dataset[0]
        need = len(self.dataset) * first.numel()
        budget = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2
        if need > budget:
            raise DfkdError(f"{what} is {len(self.dataset)} images, {need / 2**30:.1f} GiB as uint8: more than half "
                            "this machine's memory; it is read lazily by evaluation and teacher training, but "
                            "this step needs it in memory")
        parts = list(self.batches(256))
        return torch.cat([x for x, _ in parts]), torch.cat([y for _, y in parts])


@dataclass(frozen=True)
class ClassFolders:
    """Where a class-folder dataset lives (``path``: absolute, or relative to the data root) and how its
    images become tensors: ``resize`` is the evaluation resize before the center crop."""

    path: str
    resize: int
    train_dir: str = "train"
    test_dir: str = "val"
    hint: str = ""  # where the data comes from, for the missing-data error

    def open(self, spec: DatasetSpec, split: str, root: Path, train: bool) -> FolderSplit:
        base = Path(self.path) if Path(self.path).is_absolute() else root / self.path
        folder = base / (self.train_dir if split == "train" else self.test_dir)
        if not folder.is_dir():
            raise DfkdError(f"{spec.name} not found: no folder {folder} (one sub-folder of images per class)"
                            + (f"; {self.hint}" if self.hint else ""))
        found = FolderSplit(folder, spec.image_size, self.resize, spec.channels, train)
        if len(found.classes) != spec.num_classes:
            raise DfkdError(f"{folder} holds {len(found.classes)} class folders; {spec.name} has "
                            f"{spec.num_classes} classes")
        return found


def _imagenet_names() -> tuple[str, ...]:
    """ImageNet's class names in label order when the data is here: the wnid folders, named by
    ``LOC_synset_mapping.txt`` (the Kaggle layout) when the data root holds it."""
    folder = data_root() / "imagenet"
    train = folder / "train"
    if not train.is_dir():
        return ()
    wnids = sorted(p.name for p in train.iterdir() if p.is_dir())
    words: dict[str, str] = {}
    mapping = folder / "LOC_synset_mapping.txt"
    if mapping.is_file():
        for line in mapping.read_text().splitlines():
            wnid, _, text = line.partition(" ")
            words[wnid] = text.split(",")[0].strip()
    return tuple(words.get(w, w) for w in wnids)


# ImageNet-1k: the class-folder layout torchvision's reference scripts read (train/<wnid>/*.JPEG and val/<wnid>/
# *.JPEG after the usual valprep step), 224 px: resize 256 and center crop for evaluation, random resized crop
# and flip for training (torchvision references/classification/presets.py); the standard mean/std, which
# torchvision's and timm's pretrained ResNet-50 expect (Fast and DeepInversion distil torchvision's).
_register(DatasetSpec("imagenet", 1000, 3, 224, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), loader=None,
                      names_loader=_imagenet_names,
                      folder=ClassFolders("imagenet", resize=256, hint="put ImageNet's train/ and val/ class "
                                          "folders under ./data/imagenet or $DFKD_BENCH_DATA/imagenet")))


# ---------------------------------------------------------------- class folders declared by the user

DECLARED = "datasets"  # <data root>/datasets/<name>.json


def declared_path(name: str) -> Path:
    return data_root() / DECLARED / f"{name}.json"


def declared_dataset(name: str) -> DatasetSpec | None:
    """The dataset ``name`` declared with ``dfkd-bench dataset add``, or None."""
    path = declared_path(name)
    if not path.is_file():
        return None
    try:
        d = json.loads(path.read_text())
        folders = ClassFolders(d["root"], int(d["resize"]), d.get("train_dir", "train"), d.get("test_dir", "val"))
        classes = tuple(d.get("class_names", ()))
        return DatasetSpec(d["name"], int(d["num_classes"]), int(d["channels"]), int(d["image_size"]),
                           tuple(float(v) for v in d["mean"]), tuple(float(v) for v in d["std"]), loader=None,
                           class_names=classes, folder=folders)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DfkdError(f"{path} is not a dataset declaration ({type(exc).__name__}: {exc}); delete it and run "
                        "dfkd-bench dataset add again") from None


def declare_dataset(name: str, root: Path, image_size: int, mean: tuple[float, ...], std: tuple[float, ...],
                    resize: int | None = None, train_dir: str = "train", test_dir: str = "val",
                    force: bool = False) -> dict:
    """Declare the class-folder dataset ``name`` at ``root`` (``root/<train_dir>/<class>/*``, the same classes
    under ``root/<test_dir>``): images center-cropped to ``image_size`` px after resizing the shorter side to
    ``resize`` (default ``image_size``), normalized with ``mean``/``std`` (one value per channel, 1 or 3
    channels). Writes ``<data root>/datasets/<name>.json``; returns what it wrote.

    Raises:
        DfkdError: a name taken by a built-in dataset, a declaration that exists (without ``force``), missing
            folders, classes that differ between the splits, or a bad size or normalization.
    """
    if name in DATASETS:
        raise DfkdError(f"'{name}' is a built-in dataset; choose another name")
    if not name or not all(c.isalnum() or c in "-_." for c in name):
        raise DfkdError(f"dataset name {name!r} may hold only letters, digits, '-', '_' and '.'")
    path = declared_path(name)
    if path.is_file() and not force:
        raise DfkdError(f"dataset '{name}' is already declared in {path}; pass --force to replace it")
    if len(mean) not in (1, 3) or len(std) != len(mean):
        raise DfkdError(f"--mean and --std need 1 (grayscale) or 3 (RGB) values each, got {len(mean)} and {len(std)}")
    if not all(s > 0 for s in std) or not all(math.isfinite(v) for v in (*mean, *std)):
        raise DfkdError("--mean must be finite and --std positive")
    if image_size < 8 or (resize is not None and resize < image_size):
        raise DfkdError(f"--image-size must be at least 8 and --resize at least the image size, got {image_size} "
                        f"and {resize}")
    root = Path(root).resolve()
    classes = {}
    for split_dir in (train_dir, test_dir):
        folder = root / split_dir
        if not folder.is_dir():
            raise DfkdError(f"no folder {folder}: a class-folder dataset has {train_dir}/<class>/ and "
                            f"{test_dir}/<class>/ under its root")
        classes[split_dir] = sorted(p.name for p in folder.iterdir() if p.is_dir())
        if not classes[split_dir]:
            raise DfkdError(f"{folder} holds no class folders")
    if classes[train_dir] != classes[test_dir]:
        only = sorted(set(classes[train_dir]) ^ set(classes[test_dir]))
        raise DfkdError(f"{train_dir}/ and {test_dir}/ hold different classes (e.g. {only[0]!r})")
    record = {"name": name, "root": str(root), "image_size": image_size, "resize": resize or image_size,
              "channels": len(mean), "mean": list(mean), "std": list(std), "num_classes": len(classes[train_dir]),
              "class_names": classes[train_dir], "train_dir": train_dir, "test_dir": test_dir}
    from .runtime import atomic_write_json

    atomic_write_json(path, record)
    return record


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
def count_correct(model: torch.nn.Module, split: ImageSplit, normalizer: Normalizer, device: torch.device,
                  batch_size: int = 512, rank: int = 0, world: int = 1) -> tuple[int, int]:
    """(correct top-1 predictions, examples) of ``model`` on one rank's shard of ``split``, in float32 on
    every device: a barely trained student's eval-mode activations can pass float16's 65504 (seen at about
    4.7e9 in a ResNet-18 after 6 steps), and an overflowed logit is no prediction."""
    was_training = model.training
    model.eval()
    correct = total = 0
    for images, labels in split.batches(batch_size, rank, world):
        x = normalizer(to_unit(images.to(device)))
        correct += (model(x).argmax(1) == labels.to(device)).sum().item()
        total += len(labels)
    model.train(was_training)
    return correct, total


def evaluate(model: torch.nn.Module, images: torch.Tensor | ImageSplit, labels: torch.Tensor | None,
             normalizer: Normalizer, device: torch.device, batch_size: int = 512) -> float:
    """Top-1 accuracy in percent (0-100) of ``model`` on uint8 ``images`` ``(N, C, H, W)`` with ``labels``
    ``(N,)``, or on a whole :class:`ImageSplit` (``labels`` None)."""
    split = images if isinstance(images, ImageSplit) else TensorSplit(images, labels)
    correct, total = count_correct(model, split, normalizer, device, batch_size)
    return 100.0 * correct / max(1, total)
