"""insightface arcface_torch ``backbone.pth`` files (lit_tasks/models/face/convert.py).

arcface_torch does not install from the package index, so each test writes a ``backbone.pth`` with exactly the key
names and shapes its source gives (``recognition/arcface_torch/backbones/iresnet.py`` and ``mobilefacenet.py``, read
and transcribed below as plain lists, independent of our modules), filled with distinct random values, and checks that
``FaceRecognitionTask(pretrained_weights=...)`` uses every key and fills every parameter and buffer with it.
"""

from __future__ import annotations

import pytest
import torch

from lit_tasks import FaceRecognitionTask
from lit_tasks.models.face.convert import convert_face_state_dict, read_face_weights

BN = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def _bn(prefix: str, c: int) -> list[tuple[str, tuple[int, ...]]]:
    return [(f"{prefix}.{n}", () if n == "num_batches_tracked" else (c,)) for n in BN]


def arcface_iresnet_keys(layers: list[int], num_features: int = 512) -> list[tuple[str, tuple[int, ...]]]:
    """arcface_torch ``IResNet(IBasicBlock, layers, num_features=...)``: names and shapes in state-dict order."""
    keys = [("conv1.weight", (64, 3, 3, 3)), *_bn("bn1", 64), ("prelu.weight", (64,))]
    inplanes = 64
    for s, (planes, blocks) in enumerate(zip((64, 128, 256, 512), layers), start=1):
        for b in range(blocks):
            p = f"layer{s}.{b}"
            keys += [*_bn(f"{p}.bn1", inplanes), (f"{p}.conv1.weight", (planes, inplanes, 3, 3)), *_bn(f"{p}.bn2", planes),
                     (f"{p}.prelu.weight", (planes,)), (f"{p}.conv2.weight", (planes, planes, 3, 3)),
                     *_bn(f"{p}.bn3", planes)]
            if b == 0:  # stride 2 in every stage: a downsample on the first block
                keys += [(f"{p}.downsample.0.weight", (planes, inplanes, 1, 1)), *_bn(f"{p}.downsample.1", planes)]
            inplanes = planes
    keys += [*_bn("bn2", 512), ("fc.weight", (num_features, 512 * 7 * 7)), ("fc.bias", (num_features,)),
             *_bn("features", num_features)]
    return keys


def arcface_mbf_keys(blocks=(1, 4, 6, 2), scale=2, num_features=512, side=7) -> list[tuple[str, tuple[int, ...]]]:
    """arcface_torch ``MobileFaceNet(blocks=..., scale=...)`` (``get_mbf`` / ``get_mbf_large``)."""
    def conv_block(p, i, o, k=1, groups=1):  # ConvBlock: Conv2d, BatchNorm2d, PReLU under .layers
        return [(f"{p}.layers.0.weight", (o, i // groups, k, k)), *_bn(f"{p}.layers.1", o), (f"{p}.layers.2.weight", (o,))]

    def linear_block(p, i, o, k=1, groups=1):  # LinearBlock: Conv2d, BatchNorm2d
        return [(f"{p}.layers.0.weight", (o, i // groups, k, k)), *_bn(f"{p}.layers.1", o)]

    def depthwise(p, i, o, g):  # DepthWise: ConvBlock(i, g), ConvBlock(g, g, 3, groups=g), LinearBlock(g, o)
        return conv_block(f"{p}.layers.0", i, g) + conv_block(f"{p}.layers.1", g, g, 3, g) + linear_block(f"{p}.layers.2", g, o)

    def residual(p, c, n, g):
        return [k for i in range(n) for k in depthwise(f"{p}.layers.{i}", c, c, g)]

    c1, c2 = 64 * scale, 128 * scale
    keys = conv_block("layers.0", 3, c1, 3)
    keys += conv_block("layers.1", c1, c1, 3, 64) if blocks[0] == 1 else residual("layers.1", c1, blocks[0], 128)
    keys += depthwise("layers.2", c1, c1, 128) + residual("layers.3", c1, blocks[1], 128)
    keys += depthwise("layers.4", c1, c2, 256) + residual("layers.5", c2, blocks[2], 256)
    keys += depthwise("layers.6", c2, c2, 512) + residual("layers.7", c2, blocks[3], 256)
    keys += conv_block("conv_sep", c2, 512)
    keys += linear_block("features.layers.0", 512, 512, side, 512) + [("features.layers.2.weight", (num_features, 512))]
    keys += _bn("features.layers.3", num_features)
    return keys


def _backbone_pth(keys, path, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    sd = {name: (torch.tensor(7) if not shape else torch.rand(shape, generator=generator) + 0.5) for name, shape in keys}
    torch.save(sd, path)
    return sd


def _check_loaded(task: FaceRecognitionTask, reference: dict) -> None:
    own = task.model.state_dict()
    assert set(own) == set(reference), (set(own) ^ set(reference))
    for name, value in reference.items():
        assert torch.equal(own[name], value), name
    assert len(own) == len(reference)


@pytest.mark.parametrize("name,layers", [("iresnet18", [2, 2, 2, 2]), ("iresnet50", [3, 4, 14, 3])])
def test_arcface_iresnet_backbone_pth_loads_every_key(name, layers, tmp_path):
    keys = arcface_iresnet_keys(layers)
    reference = _backbone_pth(keys, tmp_path / "backbone.pth")
    converted = read_face_weights(str(tmp_path / "backbone.pth"))
    assert converted.options == dict(backbone=name, embedding_size=512, image_size=112)
    task = FaceRecognitionTask(num_identities=10, backbone=name, pretrained_weights=str(tmp_path / "backbone.pth"),
                               num_log_images=0)
    _check_loaded(task, reference)
    print(f"arcface_torch {name}: {len(keys)} keys, {len(converted.state_dict)} mapped")


@pytest.mark.parametrize("name,layers", [("iresnet34", [3, 4, 6, 3]), ("iresnet100", [3, 13, 30, 3]),
                                         ("iresnet200", [6, 26, 60, 6])])
def test_arcface_iresnet_depths_are_recognised(name, layers):
    """Every depth from its blocks per stage, and our network of that name has exactly those keys and shapes (built
    on the meta device: no memory, no time)."""
    from lit_tasks.models.face.iresnet import build_iresnet

    keys = arcface_iresnet_keys(layers, num_features=256)
    sd = {k: torch.empty(s, device="meta") for k, s in keys}
    assert convert_face_state_dict(sd).options == dict(backbone=name, embedding_size=256, image_size=112)
    with torch.device("meta"):
        ours = build_iresnet(name, embedding_size=256, channels_last=False).state_dict()
    assert {k: tuple(v.shape) for k, v in ours.items()} == dict(keys)
    print(f"arcface_torch {name}: {len(keys)} keys, {len(ours)} mapped")


@pytest.mark.parametrize("name,blocks,scale", [("mbf", (1, 4, 6, 2), 2), ("mbf_large", (2, 8, 12, 4), 4)])
def test_arcface_mobilefacenet_backbone_pth_loads_every_key(name, blocks, scale, tmp_path):
    keys = arcface_mbf_keys(blocks, scale)
    reference = _backbone_pth(keys, tmp_path / "backbone.pth")
    task = FaceRecognitionTask(num_identities=10, backbone=name, pretrained_weights=str(tmp_path / "backbone.pth"),
                               num_log_images=0)
    _check_loaded(task, reference)
    print(f"arcface_torch {name}: {len(keys)} keys, {len(reference)} mapped")


def test_face_weights_name_what_differs(tmp_path):
    reference = _backbone_pth(arcface_iresnet_keys([2, 2, 2, 2], num_features=128), tmp_path / "backbone.pth")
    path = str(tmp_path / "backbone.pth")
    with pytest.raises(ValueError, match="set backbone='iresnet18' \\(given 'resnet18'\\), embedding_size=128 \\(given 512\\)"):
        FaceRecognitionTask(num_identities=10, pretrained_weights=path)
    # arcface_torch's resumable checkpoint: the backbone part is taken, the identities' centres are not
    torch.save({"epoch": 3, "global_step": 10, "state_dict_backbone": reference,
                "state_dict_softmax_fc": {"weight": torch.zeros(5, 128)}}, tmp_path / "checkpoint_gpu_0.pt")
    task = FaceRecognitionTask(num_identities=10, backbone="iresnet18", embedding_size=128, num_log_images=0,
                               pretrained_weights=str(tmp_path / "checkpoint_gpu_0.pt"))
    _check_loaded(task, reference)
    broken = dict(reference)
    broken.pop("layer2.1.prelu.weight")
    broken["layer2.1.prelu.alpha"] = torch.zeros(128)
    torch.save(broken, tmp_path / "broken.pth")
    with pytest.raises(ValueError, match="not in the file: layer2.1.prelu.weight; 1 key\\(s\\) of the file the model "
                                         "does not use: layer2.1.prelu.alpha"):
        FaceRecognitionTask(num_identities=10, backbone="iresnet18", embedding_size=128,
                            pretrained_weights=str(tmp_path / "broken.pth"))


def test_checkpoint_of_a_published_start_needs_no_file(tmp_path):
    """What a fit's checkpoint saves: the options the file set, no file name (BaseTask.on_save_checkpoint); the task
    rebuilds from those hyperparameters once the file is gone."""
    _backbone_pth(arcface_iresnet_keys([2, 2, 2, 2], num_features=128), tmp_path / "backbone.pth")
    task = FaceRecognitionTask(num_identities=10, backbone="iresnet18", embedding_size=128, num_log_images=0,
                               pretrained_weights=str(tmp_path / "backbone.pth"))
    checkpoint = {"hyper_parameters": dict(task.hparams)}
    task.on_save_checkpoint(checkpoint)
    (tmp_path / "backbone.pth").unlink()
    assert checkpoint["hyper_parameters"]["pretrained_weights"] is None
    assert checkpoint["pretrained_weights_file"] == str(tmp_path / "backbone.pth")
    rebuilt = FaceRecognitionTask(**checkpoint["hyper_parameters"])
    rebuilt.load_state_dict(task.state_dict())
    assert all(torch.equal(v, rebuilt.state_dict()[k]) for k, v in task.state_dict().items())


def test_published_start_through_the_cli(tmp_path, monkeypatch):
    """``lit-tasks fit --model.pretrained_weights backbone.pth`` (a MobileFaceNet for the 64-px synthetic config: a
    4x4 GDC), then ``validate --ckpt_path last.ckpt`` after the file is gone: the checkpoint holds the weights and
    the options the file set."""
    from test_face_task import ROOT, SMALL_SYNTHETIC

    from lit_tasks.cli import run_cli

    _backbone_pth(arcface_mbf_keys(num_features=128, side=4), tmp_path / "backbone.pth")
    monkeypatch.chdir(tmp_path)
    config = ["--config", str(ROOT / "configs/face/arcface_synthetic.yaml"), "--trainer.accelerator=cpu", *SMALL_SYNTHETIC]
    cli = run_cli(["fit", *config, "--model.backbone=mbf", f"--model.pretrained_weights={tmp_path / 'backbone.pth'}",
                   "--trainer.max_steps=1", "--trainer.max_epochs=1", "--trainer.limit_val_batches=1"])
    assert cli.model.hparams.backbone == "mbf" and cli.model.hparams.image_size == 64
    last = next(tmp_path.glob("lightning_logs/arcface_synthetic/version_*/checkpoints/last.ckpt"))
    state = torch.load(last, weights_only=True, map_location="cpu")
    assert state["hyper_parameters"]["pretrained_weights"] is None and state["hyper_parameters"]["backbone"] == "mbf"
    (tmp_path / "backbone.pth").unlink()
    run_cli(["validate", *config, "--model.backbone=mbf", f"--ckpt_path={last}", "--trainer.limit_val_batches=1"])
