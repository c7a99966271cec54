"""Face embedding networks: insightface's IResNet / MobileFaceNet, or a timm backbone + their embedding head.

Images enter as ``(B, 3, S, S)`` floats in [0, 1] and are normalised inside, ``(x - 0.5) / 0.5`` as
insightface does, so a trained (or exported) network takes plain [0, 1] images. :func:`build_face_network`
picks the network from its name by one rule (see there); every network owns its memory format
(``channels_last``), so the task treats them alike.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lit_tasks.models.backbone import build_backbone
from lit_tasks.models.face.iresnet import build_iresnet
from lit_tasks.models.face.mobilefacenet import build_mobilefacenet

# Names built from insightface's definitions here; every other backbone name is a timm model.
IRESNET_PREFIX, MOBILEFACENET_PREFIXES = "iresnet", ("mbf", "mobilefacenet")


class EmbeddingHead(nn.Module):
    """``(B, C, h, w)`` features -> ``(B, D)``: BN2d -> Dropout -> Flatten -> Linear -> BN1d.

    The spatial map is flattened, not pooled, so the FC keeps where a feature is (insightface iresnet's
    ``features`` head); the final BatchNorm's scale is fixed at 1 (only its shift learns), as there.
    Runs in fp32 even under autocast (insightface: "FC runs in fp32").
    """

    def __init__(self, *, channels: int, height: int, width: int, embedding_size: int = 512,
                 dropout: float = 0.0) -> None:
        super().__init__()
        self.bn2d = nn.BatchNorm2d(channels, eps=1e-5)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(channels * height * width, embedding_size)
        self.bn1d = nn.BatchNorm1d(embedding_size, eps=1e-5)
        nn.init.constant_(self.bn1d.weight, 1.0)
        self.bn1d.weight.requires_grad_(False)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        with torch.autocast(features.device.type, enabled=False):
            x = self.dropout(self.bn2d(features.float()))
            return self.bn1d(self.fc(torch.flatten(x, 1)))


class EmbeddingNetwork(nn.Module):
    """``(B, 3, S, S)`` images in [0, 1] -> raw (un-normalised) ``(B, D)`` embeddings.

    Args:
        backbone: timm model name with ``features_only`` support; its last stage is used.
        image_size: the square input side S the head is sized for (112 for aligned faces).
        embedding_size: D.
        dropout: dropout before the FC (0 in insightface).
        output_stride: 16 gives the 7x7 map at 112 px of insightface's iresnets with a timm ResNet
            (its last stage dilated); 32 keeps timm's default.
        channels_last: run the backbone in channels-last memory format (faster convolutions on CPU).
    """

    def __init__(
        self,
        *,
        backbone: str = "resnet18",
        image_size: int = 112,
        embedding_size: int = 512,
        dropout: float = 0.0,
        output_stride: int = 16,
        channels_last: bool = True,
        pretrained: bool = False,
    ) -> None:
        super().__init__()
        self.image_size, self.channels_last = image_size, channels_last
        self.backbone = build_backbone(
            backbone, pretrained=pretrained, out_indices=(-1,), output_stride=None if output_stride == 32 else output_stride
        )
        self.register_buffer("mean", torch.full((1, 3, 1, 1), 0.5), persistent=False)
        self.register_buffer("std", torch.full((1, 3, 1, 1), 0.5), persistent=False)
        # Size the head from the feature map the backbone really produces at image_size.
        was_training = self.backbone.training
        self.backbone.eval()
        with torch.no_grad():
            _, channels, height, width = self.backbone(torch.zeros(1, 3, image_size, image_size))[-1].shape
        self.backbone.train(was_training)
        self.head = EmbeddingHead(channels=channels, height=height, width=width, embedding_size=embedding_size,
                                  dropout=dropout)
        if channels_last:
            self.backbone.to(memory_format=torch.channels_last)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.shape[-2:] != (self.image_size, self.image_size):
            raise ValueError(
                f"images of size {tuple(images.shape[-2:])}: this network was built for {self.image_size}x{self.image_size}"
            )
        x = (images - self.mean) / self.std
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.head(self.backbone(x)[-1])


def build_face_network(
    backbone: str = "resnet18",
    *,
    image_size: int = 112,
    embedding_size: int = 512,
    dropout: float = 0.0,
    output_stride: int = 16,
    channels_last: bool = True,
    pretrained: bool = False,
) -> nn.Module:
    """``(B, 3, S, S)`` images in [0, 1] -> raw ``(B, D)`` embeddings, chosen by one rule on the name.

    * ``iresnet18|34|50|100|200`` (names starting with ``iresnet``): insightface arcface_torch's IResNet
      (:mod:`lit_tasks.models.face.iresnet`: full-resolution stem, BN-PReLU blocks, BN-Dropout-FC-BN embedding);
    * ``mbf``, ``mbf_large`` (names starting with ``mbf`` or ``mobilefacenet``): arcface_torch's MobileFaceNet
      (:mod:`lit_tasks.models.face.mobilefacenet`, GDC embedding; it has no dropout);
    * any other name: a timm backbone (``features_only``, last stage) under :class:`EmbeddingHead`
      (:class:`EmbeddingNetwork`).

    Both insightface networks reduce 112 px to the 7x7 map by stride 16 and have no downloadable weights here
    (load an arcface_torch state dict with ``load_state_dict``: the module names are theirs).

    Raises:
        ValueError: ``pretrained``, an ``output_stride`` other than 16, or ``dropout`` for MobileFaceNet, with an
            insightface network; an unknown insightface name (the message lists the known ones).
    """
    if backbone.startswith((IRESNET_PREFIX, *MOBILEFACENET_PREFIXES)):
        if pretrained:
            raise ValueError(f"backbone={backbone!r}: no pretrained weights are downloaded for insightface's networks; "
                             "load an arcface_torch backbone.pth with pretrained_weights instead")
        if output_stride != 16:
            raise ValueError(f"backbone={backbone!r} has a fixed stride of 16 (7x7 at 112 px); output_stride="
                             f"{output_stride} cannot apply")
        if backbone.startswith(IRESNET_PREFIX):
            return build_iresnet(backbone, embedding_size=embedding_size, dropout=dropout, image_size=image_size,
                                 channels_last=channels_last)
        if dropout:
            raise ValueError(f"backbone={backbone!r}: MobileFaceNet has no dropout (got dropout={dropout})")
        return build_mobilefacenet(backbone, embedding_size=embedding_size, image_size=image_size,
                                   channels_last=channels_last)
    return EmbeddingNetwork(backbone=backbone, image_size=image_size, embedding_size=embedding_size, dropout=dropout,
                            output_stride=output_stride, channels_last=channels_last, pretrained=pretrained)


class NormalisedEmbedder(nn.Module):
    """Images -> L2-normalised embeddings, optionally fused with the embedding of the mirrored image.

    ``flip=True`` is insightface's "Accuracy-Flip" test embedding: ``normalize(f(x) + f(flip(x)))``.
    This is the module :mod:`tools.export` writes to TorchScript / ONNX.
    """

    def __init__(self, network: nn.Module, flip: bool = True) -> None:
        super().__init__()
        self.network, self.flip = network, flip

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.flip:
            both = self.network(torch.cat([images, images.flip(-1)], dim=0))
            embeddings = both[: images.shape[0]] + both[images.shape[0] :]
        else:
            embeddings = self.network(images)
        return F.normalize(embeddings.float(), dim=1)
