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


class ReferenceGenerator(nn.Module):
    """The generator family of the online methods' reference code (DAFL, DFAD, ZSKT and the
    ``datafree`` package's GAN-based methods), with PyTorch's default initialization as there:

        z -> linear to (widths[0], H/4, W/4) -> BN -> x2 upsample, conv, BN, LeakyReLU(0.2)
          -> x2 upsample, conv, BN, LeakyReLU(0.2) -> conv to C channels -> output head

    ``output`` is ``"tanh_bn"`` (tanh, then a BN without affine: DAFL, DFAD), ``"bn"`` (an affine BN:
    ZSKT) or ``"sigmoid"`` (the package). The first two produce images in the dataset's normalized
    space (``normalized_output``): their code feeds that output to the teacher as it is.
    """

    OUTPUTS = ("tanh_bn", "bn", "sigmoid")

    def __init__(self, nz: int, widths: tuple[int, int, int], image_size: int, channels: int, output: str,
                 conv_bias: bool = True, bn_eps: float = 1e-5):
        super().__init__()
        if output not in self.OUTPUTS:
            raise ValueError(f"output must be one of {', '.join(self.OUTPUTS)}, got {output!r}")
        c0, c1, c2 = widths
        self.nz, self.image_size, self.output = nz, image_size, output
        self.normalized_output = output != "sigmoid"
        self.init_size = max(1, image_size // 4)
        self.project = nn.Linear(nz, c0 * self.init_size**2)
        self.body = nn.Sequential(
            nn.BatchNorm2d(c0),
            nn.Upsample(scale_factor=2),
            nn.Conv2d(c0, c1, 3, 1, 1, bias=conv_bias),
            nn.BatchNorm2d(c1, eps=bn_eps),
            nn.LeakyReLU(0.2, inplace=True),
            nn.Upsample(scale_factor=2),
            nn.Conv2d(c1, c2, 3, 1, 1, bias=conv_bias),
            nn.BatchNorm2d(c2, eps=bn_eps),
            nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(c2, channels, 3, 1, 1),
        )
        if output == "tanh_bn":
            self.head = nn.Sequential(nn.Tanh(), nn.BatchNorm2d(channels, affine=False))
        elif output == "bn":
            self.head = nn.BatchNorm2d(channels)
        else:
            self.head = nn.Sigmoid()

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.project(z).view(z.shape[0], -1, self.init_size, self.init_size)
        x = self.body(x)
        if x.shape[-1] != self.image_size:  # sizes not divisible by 4
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False)
        return self.head(x)
