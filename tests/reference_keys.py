"""State-dict key lists (names and shapes, in order) of reference checkpoints the converters read, shared by tests."""

from __future__ import annotations

Keys = list[tuple[str, tuple[int, ...]]]


def bn_keys(prefix: str, channels: int) -> Keys:
    """A BatchNorm's entries as torch saves them (``num_batches_tracked`` is a 0-d tensor)."""
    return [(f"{prefix}.{n}", () if n == "num_batches_tracked" else (channels,))
            for n in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")]


def resnet_stages_keys(depth: int, prefix: str = "backbone") -> Keys:
    """The four bottleneck stages of a torchvision-layout ResNet-50/101 (mmcv's ``ResNet`` and ``ResNetV1c`` alike)."""
    blocks = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}[depth]
    keys: Keys = []
    inplanes = 64
    for s, (planes, n) in enumerate(zip((64, 128, 256, 512), blocks), start=1):
        for b in range(n):
            p = f"{prefix}.layer{s}.{b}"
            keys += [(f"{p}.conv1.weight", (planes, inplanes, 1, 1)), *bn_keys(f"{p}.bn1", planes),
                     (f"{p}.conv2.weight", (planes, planes, 3, 3)), *bn_keys(f"{p}.bn2", planes),
                     (f"{p}.conv3.weight", (planes * 4, planes, 1, 1)), *bn_keys(f"{p}.bn3", planes * 4)]
            if b == 0:
                keys += [(f"{p}.downsample.0.weight", (planes * 4, inplanes, 1, 1)),
                         *bn_keys(f"{p}.downsample.1", planes * 4)]
            inplanes = planes * 4
    return keys
