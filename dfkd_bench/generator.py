"""The DCGAN-style generator shared by CMI, Fast and CSD."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def dcgan_init_(module: nn.Module) -> None:
    """The reference code's ``reset_model``: conv/linear weights N(0, 0.02) with zero biases,
    BatchNorm weights N(1, 0.02) with zero biases (running statistics untouched)."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
            nn.init.normal_(m.weight, 0.0, 0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.normal_(m.weight, 1.0, 0.02)
            nn.init.zeros_(m.bias)


class Generator(nn.Module):
    """z -> image in [0, 1]: linear to (2*ngf, H/4, W/4), two x2 upsampling conv stages, sigmoid.

    A new generator has PyTorch's default initialization, as in the reference code: Fast keeps it,
    CMI and CSD call :meth:`reset_parameters` (the DCGAN initialization) at the start of every round.
    """

    def __init__(self, nz: int = 256, ngf: int = 64, image_size: int = 32, channels: int = 3):
        super().__init__()
        self.nz, self.image_size = nz, image_size
        self.init_size = max(1, image_size // 4)
        self.project = nn.Linear(nz, 2 * ngf * self.init_size**2)
        self.body = nn.Sequential(
            nn.BatchNorm2d(2 * ngf),
            nn.Upsample(scale_factor=2),
            nn.Conv2d(2 * ngf, 2 * ngf, 3, 1, 1, bias=False),
            nn.BatchNorm2d(2 * ngf),
            nn.LeakyReLU(0.2, inplace=True),
            nn.Upsample(scale_factor=2),
            nn.Conv2d(2 * ngf, ngf, 3, 1, 1, bias=False),
            nn.BatchNorm2d(ngf),
            nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(ngf, channels, 3, 1, 1),
        )

    def reset_parameters(self) -> None:
        """The DCGAN initialization (CMI's and CSD's per-round reset)."""
        dcgan_init_(self)

    def reset_input_layers(self) -> None:
        """Fast-Meta's scheduled reset (``reset_l0``): the input projection's weights and the first BatchNorm's
        weights drawn from N(0, 0.02), their biases zeroed. The BN weight's mean of 0 (not 1) is the reference
        code's, kept as it is."""
        for m in (self.project, self.body[0]):
            nn.init.normal_(m.weight, 0.0, 0.02)
            nn.init.zeros_(m.bias)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.project(z).view(z.shape[0], -1, self.init_size, self.init_size)
        x = self.body(x)
        if x.shape[-1] != self.image_size:
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False)
        return torch.sigmoid(x)
