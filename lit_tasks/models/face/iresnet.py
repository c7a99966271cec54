"""insightface's IResNet ("improved" ResNet of ArcFace, Deng et al. CVPR 2019, section 3.2 / "LResNet-E-IR").

As arcface_torch defines it (``recognition/arcface_torch/backbones/iresnet.py``): a 3x3 stride-1 stem at the full
112x112 resolution (BN-PReLU after it), four stages of :class:`IBasicBlock`
(BN - conv3x3 - BN - PReLU - conv3x3(stride) - BN, plus the shortcut; the stride on the second conv), each stage
halving the resolution (56, 28, 14, 7), then the embedding layer BN2d - flatten - dropout - FC(512*7*7 -> D) -
BN1d whose scale is fixed at 1. Depths: ``[2, 2, 2, 2]`` r18, ``[3, 4, 6, 3]`` r34, ``[3, 4, 14, 3]`` r50,
``[3, 13, 30, 3]`` r100, ``[6, 26, 60, 6]`` r200.

Images enter as ``(B, 3, S, S)`` floats in [0, 1] and are normalised inside with ``(x - 0.5) / 0.5`` (what the
arcface_torch data pipeline does), so the network has the same call interface as
:class:`~lit_tasks.models.face.embedding.EmbeddingNetwork`: images -> raw ``(B, D)`` embeddings.

Module and parameter names are insightface's (``conv1``, ``layer3.7.conv2``, ``fc``, ``features``, ...), so a
state dict saved by arcface_torch loads with ``load_state_dict`` unchanged; that is why the embedding layer is
written out here instead of reusing :class:`~lit_tasks.models.face.embedding.EmbeddingHead` (same computation,
other names). Precision: the body follows the surrounding autocast (Lightning's ``precision="16-mixed"`` /
``"bf16-mixed"``), or runs under float16 autocast when built with ``fp16=True`` as insightface's flag does; the
FC and the last BN always run in float32 ("FC runs in fp32 even in fp16 mode").
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from lit_tasks.models.backbone import Normalize

IRESNET_LAYERS: dict[str, tuple[int, int, int, int]] = {
    "iresnet18": (2, 2, 2, 2),
    "iresnet34": (3, 4, 6, 3),
    "iresnet50": (3, 4, 14, 3),
    "iresnet100": (3, 13, 30, 3),
    "iresnet200": (6, 26, 60, 6),
}
ALIASES = {"r18": "iresnet18", "r34": "iresnet34", "r50": "iresnet50", "r100": "iresnet100", "r200": "iresnet200"}
FACE_MEAN = FACE_STD = (0.5, 0.5, 0.5)


def conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


def body_autocast(x: torch.Tensor, fp16: bool) -> contextlib.AbstractContextManager:
    """float16 autocast on ``x``'s device when ``fp16`` (insightface's flag); otherwise leave the caller's autocast alone."""
    return torch.autocast(x.device.type, dtype=torch.float16) if fp16 else contextlib.nullcontext()


class IBasicBlock(nn.Module):
    """BN - conv3x3 - BN - PReLU - conv3x3(stride) - BN, plus the (1x1 conv + BN when the shape changes) shortcut."""

    def __init__(self, inplanes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(inplanes, eps=1e-5)
        self.conv1 = conv3x3(inplanes, planes)
        self.bn2 = nn.BatchNorm2d(planes, eps=1e-5)
        self.prelu = nn.PReLU(planes)
        self.conv2 = conv3x3(planes, planes, stride)
        self.bn3 = nn.BatchNorm2d(planes, eps=1e-5)
        self.downsample = None
        if stride != 1 or inplanes != planes:
            self.downsample = nn.Sequential(nn.Conv2d(inplanes, planes, 1, stride=stride, bias=False),
                                            nn.BatchNorm2d(planes, eps=1e-5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn3(self.conv2(self.prelu(self.bn2(self.conv1(self.bn1(x))))))
        return out + (self.downsample(x) if self.downsample is not None else x)


class IResNet(nn.Module):
    """``(B, 3, S, S)`` images in [0, 1] -> raw ``(B, D)`` embeddings (insightface arcface_torch ``IResNet``).

    Args:
        layers: blocks per stage (see :data:`IRESNET_LAYERS`).
        embedding_size: D (insightface ``num_features``).
        dropout: before the FC (0 in every arcface_torch config).
        image_size: input side S; the FC is sized for its final map (7x7 at 112, the only size insightface uses).
        fp16: run the body under float16 autocast (insightface's flag); leave False under Lightning mixed precision.
        channels_last: run the convolutions in channels-last memory format (faster on CPU and tensor cores).
    """

    def __init__(
        self,
        *,
        layers: tuple[int, int, int, int] | list[int],
        embedding_size: int = 512,
        dropout: float = 0.0,
        image_size: int = 112,
        fp16: bool = False,
        channels_last: bool = True,
    ) -> None:
        super().__init__()
        if len(layers) != 4 or min(layers) < 1:
            raise ValueError(f"layers {list(layers)}: expected 4 stages of at least one block")
        self.image_size, self.fp16, self.channels_last = image_size, fp16, channels_last
        self.normalize = Normalize(FACE_MEAN, FACE_STD)
        self.conv1 = conv3x3(3, 64)
        self.bn1 = nn.BatchNorm2d(64, eps=1e-5)
        self.prelu = nn.PReLU(64)
        inplanes = 64
        for n, (planes, blocks) in enumerate(zip((64, 128, 256, 512), layers), start=1):
            stage = [IBasicBlock(inplanes, planes, stride=2)] + [IBasicBlock(planes, planes) for _ in range(blocks - 1)]
            setattr(self, f"layer{n}", nn.Sequential(*stage))
            inplanes = planes
        side = image_size
        for _ in range(4):
            side = (side + 1) // 2  # 3x3 conv, stride 2, padding 1
        self.feature_size = side
        self.bn2 = nn.BatchNorm2d(512, eps=1e-5)
        self.dropout = nn.Dropout(p=dropout, inplace=True)
        self.fc = nn.Linear(512 * side * side, embedding_size)
        self.features = nn.BatchNorm1d(embedding_size, eps=1e-5)
        self._init_weights()
        if channels_last:
            self.to(memory_format=torch.channels_last)

    def _init_weights(self) -> None:
        """insightface's initialisation: conv weights N(0, 0.1), BN scale 1 / shift 0, FC PyTorch's default."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0, 0.1)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.ones_(self.features.weight)
        self.features.weight.requires_grad_(False)  # fixed scale: only the shift of the embedding BN learns

    def _check(self, images: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_tracing() and (images.ndim != 4 or images.shape[1] != 3
                                           or tuple(images.shape[-2:]) != (self.image_size, self.image_size)):
            raise ValueError(f"images of shape {tuple(images.shape)}: this network takes (B, 3, {self.image_size}, "
                             f"{self.image_size})")
        x = self.normalize(images)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def forward_features(self, images: torch.Tensor) -> list[torch.Tensor]:
        """The stem's and the four stages' outputs: ``(B, 64, S, S)``, ``(B, 64, S/2, S/2)`` ... ``(B, 512, S/16, S/16)``."""
        x = self._check(images)
        with body_autocast(x, self.fp16):
            outputs = [self.prelu(self.bn1(self.conv1(x)))]
            for n in range(1, 5):
                outputs.append(getattr(self, f"layer{n}")(outputs[-1]))
        return outputs

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self._check(images)
        with body_autocast(x, self.fp16):
            x = self.prelu(self.bn1(self.conv1(x)))
            x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
            x = self.dropout(torch.flatten(self.bn2(x), 1))
        with torch.autocast(x.device.type, enabled=False):
            return self.features(self.fc(x.float()))


def build_iresnet(
    name: str,
    *,
    embedding_size: int = 512,
    dropout: float = 0.0,
    image_size: int = 112,
    fp16: bool = False,
    channels_last: bool = True,
) -> IResNet:
    """insightface's IResNet by name: ``iresnet18|34|50|100|200`` (or arcface_torch's ``r18`` ... ``r200``).

    Never downloads anything; load arcface_torch weights with ``model.load_state_dict(torch.load(path))``.
    """
    key = ALIASES.get(name, name)
    if key not in IRESNET_LAYERS:
        raise ValueError(f"unknown IResNet {name!r}: expected one of {sorted(IRESNET_LAYERS) + sorted(ALIASES)}")
    return IResNet(layers=IRESNET_LAYERS[key], embedding_size=embedding_size, dropout=dropout, image_size=image_size,
                   fp16=fp16, channels_last=channels_last)
