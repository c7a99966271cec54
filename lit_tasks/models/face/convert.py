"""insightface arcface_torch weights (``backbone.pth``) onto our IResNet / MobileFaceNet.

Our module names are arcface_torch's (``recognition/arcface_torch/backbones/iresnet.py`` and ``mobilefacenet.py``), so
the state dict maps one to one, key for key; what the converter adds is the architecture the file needs, read from its
shapes (:func:`convert_face_state_dict`):

- IResNet: ``conv1``, ``bn1``, ``prelu``, ``layer{1..4}.{b}.{bn1,conv1,bn2,prelu,conv2,bn3,downsample.0/1}``, ``bn2``,
  ``fc`` (``512 * 7 * 7 -> D``), ``features`` (BatchNorm1d); blocks per stage give the depth: ``[2, 2, 2, 2]`` r18,
  ``[3, 4, 6, 3]`` r34, ``[3, 4, 14, 3]`` r50, ``[3, 13, 30, 3]`` r100, ``[6, 26, 60, 6]`` r200.
- MobileFaceNet: ``layers.{0..7}`` (ConvBlock / DepthWise / Residual, each ``.layers.`` inside), ``conv_sep``,
  ``features.layers.{0,2,3}`` (GDC: depthwise 7x7, bias-free FC, BatchNorm1d); ``mbf`` (64 x 2 channels, blocks
  1, 4, 6, 2) or ``mbf_large`` (64 x 4, blocks 2, 8, 12, 4).

A ``backbone.pth`` holds the embedding network only: the margin head's class centres (one per training identity) are
not in it and start fresh; they would not transfer to other identities anyway. arcface_torch's resumable
``checkpoint_gpu_{rank}.pt`` is read too (its ``state_dict_backbone``; the sharded ``state_dict_softmax_fc`` is left).
"""

from __future__ import annotations

from typing import Mapping

from torch import Tensor

from lit_tasks.models.face.iresnet import IRESNET_LAYERS
from lit_tasks.models.face.mobilefacenet import MOBILEFACENET_CONFIGS
from lit_tasks.models.published import Converted, blocks_per_stage, converted_from, read_file


def detect_face_layout(state_dict: Mapping[str, Tensor]) -> str:
    """``"iresnet"`` or ``"mobilefacenet"`` (arcface_torch's names, which are ours)."""
    keys = set(state_dict)
    if {"conv1.weight", "layer1.0.bn1.weight", "fc.weight", "features.running_var"} <= keys:
        return "iresnet"
    if {"layers.0.layers.0.weight", "conv_sep.layers.0.weight", "features.layers.2.weight"} <= keys:
        return "mobilefacenet"
    raise ValueError(f"not an arcface_torch IResNet / MobileFaceNet state dict; first keys: {list(state_dict)[:5]}")


def _mobilefacenet_name(state_dict: Mapping[str, Tensor]) -> str:
    scale = state_dict["layers.0.layers.0.weight"].shape[0] // 64
    residual = lambda k: len({key.split(".")[3] for key in state_dict if key.startswith(f"layers.{k}.layers.")  # noqa: E731
                              and key.split(".")[4] == "layers"})
    first = residual(1) if "layers.1.layers.0.layers.0.layers.0.weight" in state_dict else 1
    blocks = (first, residual(3), residual(5), residual(7))
    for name, (config_blocks, config_scale) in MOBILEFACENET_CONFIGS.items():
        if name != "mobilefacenet" and (tuple(config_blocks), config_scale) == (blocks, scale):
            return name
    raise ValueError(f"arcface_torch MobileFaceNet with blocks {blocks} and width scale {scale}: neither mbf "
                     f"{MOBILEFACENET_CONFIGS['mbf']} nor mbf_large {MOBILEFACENET_CONFIGS['mbf_large']}")


def convert_face_state_dict(state_dict: Mapping[str, Tensor]) -> Converted:
    """An arcface_torch ``backbone.pth`` state dict -> :class:`Converted` (names unchanged; options from shapes)."""
    sd = dict(state_dict)
    if detect_face_layout(sd) == "iresnet":
        layers = blocks_per_stage(sd, "")
        names = [name for name, config in IRESNET_LAYERS.items() if tuple(config) == layers]
        if not names:
            raise ValueError(f"arcface_torch IResNet with {list(layers)} blocks per stage: not one of "
                             f"{ {k: list(v) for k, v in IRESNET_LAYERS.items()} }")
        side = round((sd["fc.weight"].shape[1] / sd["bn2.weight"].shape[0]) ** 0.5)
        options = dict(backbone=names[0], embedding_size=int(sd["fc.weight"].shape[0]), image_size=16 * side)
        return Converted(sd, options, f"arcface_torch {names[0]}")
    name = _mobilefacenet_name(sd)
    side = sd["features.layers.0.layers.0.weight"].shape[-1]
    options = dict(backbone=name, embedding_size=int(sd["features.layers.2.weight"].shape[0]), image_size=16 * side)
    return Converted(sd, options, f"arcface_torch {name}")


def read_face_weights(path: str) -> Converted:
    """A local ``backbone.pth`` (or ``checkpoint_gpu_*.pt``, or a converted file) as ours."""
    obj = read_file(path)
    if isinstance(obj, dict) and isinstance(obj.get("state_dict_backbone"), dict):  # arcface_torch's resumable file
        obj = obj["state_dict_backbone"]
    return converted_from(obj, path, convert_face_state_dict)
