"""Per-sample batch augmentation on the device (kornia): every image gets its own crop and flip."""

from __future__ import annotations

import kornia.augmentation as K
import torch.nn as nn


def crop_flip(image_size: int, padding: int = 4) -> nn.Module:
    """Random crop with zero padding plus horizontal flip, the standard small-image augmentation."""
    return nn.Sequential(
        K.RandomCrop((image_size, image_size), padding=padding),
        K.RandomHorizontalFlip(),
    )


def resized_crop_flip(image_size: int, scale: tuple[float, float] = (0.25, 1.0)) -> nn.Module:
    """Random resized crop (a local view, as in CMI) plus horizontal flip."""
    return nn.Sequential(
        K.RandomResizedCrop((image_size, image_size), scale=scale),
        K.RandomHorizontalFlip(),
    )
