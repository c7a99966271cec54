"""MobileFaceNet (Chen et al. 2018, arXiv 1804.07573) as arcface_torch defines it (``backbones/mobilefacenet.py``).

Stem conv3x3/2 (PReLU), a grouped 3x3 conv (or residual blocks), then inverted-residual "DepthWise" blocks
(1x1 expand - depthwise 3x3 - 1x1 linear projection) at strides 2, 2, 2 with residual stages between them, a
1x1 conv to 512 channels, and the global depthwise convolution (GDC) embedding: a 7x7 depthwise conv over the
whole 7x7 map (no pooling), a bias-free FC to D and BatchNorm1d. ``mbf``: ``blocks=(1, 4, 6, 2)``, width scale 2;
``mbf_large``: ``blocks=(2, 8, 12, 4)``, scale 4. The reference's quirks are kept (the expansion widths 128 /
256 / 512 and the ``groups=64`` second conv do not follow the width scale), and so are its module names, so an
arcface_torch state dict loads unchanged.

Images ``(B, 3, 112, 112)`` in [0, 1] are normalised inside with ``(x - 0.5) / 0.5``; output raw ``(B, D)``
embeddings. Precision as :mod:`lit_tasks.models.face.iresnet`: the body under the caller's (or, with ``fp16``,
float16) autocast; the 1x1 conv to 512 and the GDC head in float32.
"""

from __future__ import annotations

import torch
from torch import nn

from lit_tasks.models.backbone import Normalize
from lit_tasks.models.face.iresnet import FACE_MEAN, FACE_STD, body_autocast

MOBILEFACENET_CONFIGS: dict[str, tuple[tuple[int, int, int, int], int]] = {
    "mobilefacenet": ((1, 4, 6, 2), 2),
    "mbf": ((1, 4, 6, 2), 2),
    "mbf_large": ((2, 8, 12, 4), 4),
}


class ConvBlock(nn.Module):
    """Conv (no bias) - BN - PReLU."""

    def __init__(self, in_c: int, out_c: int, kernel: int = 1, stride: int = 1, padding: int = 0, groups: int = 1) -> None:
        super().__init__()
        self.layers = nn.Sequential(nn.Conv2d(in_c, out_c, kernel, stride, padding, groups=groups, bias=False),
                                    nn.BatchNorm2d(out_c), nn.PReLU(out_c))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class LinearBlock(nn.Module):
    """Conv (no bias) - BN, no activation (the linear bottleneck)."""

    def __init__(self, in_c: int, out_c: int, kernel: int = 1, stride: int = 1, padding: int = 0, groups: int = 1) -> None:
        super().__init__()
        self.layers = nn.Sequential(nn.Conv2d(in_c, out_c, kernel, stride, padding, groups=groups, bias=False),
                                    nn.BatchNorm2d(out_c))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class DepthWise(nn.Module):
    """1x1 to ``groups`` channels - depthwise 3x3 (stride) - 1x1 linear to ``out_c``; residual if asked (same shape)."""

    def __init__(self, in_c: int, out_c: int, residual: bool = False, stride: int = 2, groups: int = 1) -> None:
        super().__init__()
        self.residual = residual
        self.layers = nn.Sequential(ConvBlock(in_c, groups), ConvBlock(groups, groups, 3, stride, 1, groups=groups),
                                    LinearBlock(groups, out_c))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.layers(x) if self.residual else self.layers(x)


class Residual(nn.Module):
    """``num_block`` residual stride-1 :class:`DepthWise` blocks of width ``c``."""

    def __init__(self, c: int, num_block: int, groups: int) -> None:
        super().__init__()
        self.layers = nn.Sequential(*[DepthWise(c, c, residual=True, stride=1, groups=groups) for _ in range(num_block)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class GDC(nn.Module):
    """Global depthwise conv embedding: depthwise 7x7 over the 7x7 map - flatten - FC (no bias) - BatchNorm1d."""

    def __init__(self, embedding_size: int, side: int = 7) -> None:
        super().__init__()
        self.layers = nn.Sequential(LinearBlock(512, 512, side, 1, 0, groups=512), nn.Flatten(),
                                    nn.Linear(512, embedding_size, bias=False), nn.BatchNorm1d(embedding_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class MobileFaceNet(nn.Module):
    """``(B, 3, 112, 112)`` images in [0, 1] -> raw ``(B, D)`` embeddings.

    Args:
        blocks: residual blocks of the four stages (the first stage is a grouped conv when it is 1).
        scale: width multiplier of the 64 / 128 channel stages.
        embedding_size: D.
        image_size: input side (the GDC kernel is sized to the final map; 7 at 112).
        fp16: body under float16 autocast (insightface's flag).
        channels_last: channels-last memory format for the convolutions.
    """

    def __init__(
        self,
        *,
        blocks: tuple[int, int, int, int] = (1, 4, 6, 2),
        scale: int = 2,
        embedding_size: int = 512,
        image_size: int = 112,
        fp16: bool = False,
        channels_last: bool = True,
    ) -> None:
        super().__init__()
        self.image_size, self.fp16, self.channels_last = image_size, fp16, channels_last
        self.normalize = Normalize(FACE_MEAN, FACE_STD)
        c1, c2 = 64 * scale, 128 * scale
        first = (ConvBlock(c1, c1, 3, 1, 1, groups=64) if blocks[0] == 1 else Residual(c1, blocks[0], groups=128))
        self.layers = nn.ModuleList([
            ConvBlock(3, c1, 3, 2, 1),
            first,
            DepthWise(c1, c1, stride=2, groups=128),
            Residual(c1, blocks[1], groups=128),
            DepthWise(c1, c2, stride=2, groups=256),
            Residual(c2, blocks[2], groups=256),
            DepthWise(c2, c2, stride=2, groups=512),
            Residual(c2, blocks[3], groups=256),
        ])
        side = image_size
        for _ in range(4):
            side = (side + 1) // 2
        self.conv_sep = ConvBlock(c2, 512)
        self.features = GDC(embedding_size, side)
        self._init_weights()
        if channels_last:
            self.to(memory_format=torch.channels_last)

    def _init_weights(self) -> None:
        """As the reference: Kaiming-normal (fan_out) convs and linears, BN2d scale 1 / shift 0."""
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_tracing() and (images.ndim != 4 or images.shape[1] != 3
                                           or tuple(images.shape[-2:]) != (self.image_size, self.image_size)):
            raise ValueError(f"images of shape {tuple(images.shape)}: this network takes (B, 3, {self.image_size}, "
                             f"{self.image_size})")
        x = self.normalize(images)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with body_autocast(x, self.fp16):
            for layer in self.layers:
                x = layer(x)
        with torch.autocast(x.device.type, enabled=False):
            return self.features(self.conv_sep(x.float()))


def build_mobilefacenet(
    name: str = "mbf",
    *,
    embedding_size: int = 512,
    image_size: int = 112,
    fp16: bool = False,
    channels_last: bool = True,
) -> MobileFaceNet:
    """arcface_torch's MobileFaceNet by name: ``mbf`` (alias ``mobilefacenet``) or ``mbf_large``."""
    if name not in MOBILEFACENET_CONFIGS:
        raise ValueError(f"unknown MobileFaceNet {name!r}: expected one of {sorted(MOBILEFACENET_CONFIGS)}")
    blocks, scale = MOBILEFACENET_CONFIGS[name]
    return MobileFaceNet(blocks=blocks, scale=scale, embedding_size=embedding_size, image_size=image_size, fp16=fp16,
                         channels_last=channels_last)
