"""Published RLE weights (lit_tasks/models/pose/convert.py): the official release and mmpose's checkpoints.

Neither reference installs from the package index. Each test writes a file with exactly the reference's key names and
shapes (official ``RegressFlow`` with its ``ResNet`` / ``Linear`` / ``RealNVP``; mmpose's ``ResNet`` + ``RLEHead`` +
``RLELoss.flow_model``, in its 0.x and 1.x names), transcribed below from their sources, and checks that
``PoseTask(pretrained_weights=...)`` uses every key and fills every tensor of the regressor and of the loss's flow.
Both references' backbones are torchvision's ResNet (same names, same computation), so their forward pass can be
written here from torchvision's ``resnet50`` and their head code: the outputs are compared too.
"""

from __future__ import annotations

import pytest
import torch
import torchvision

from lit_tasks import PoseTask
from lit_tasks.models.pose.convert import convert_pose_state_dict, read_pose_weights

K = 17
# float32, the same operations with the same kernels (both NCHW: channels_last sums in another order, ~1e-5 on its
# own), O(1) outputs; 1e-4 is the bound.
ATOL = 1e-4


def _calibrated_resnet50(seed: int = 0) -> torch.nn.Module:
    """torchvision's ResNet-50 (random) with BatchNorm statistics of a train-mode pass: O(1) features."""
    torch.manual_seed(seed)
    net = torchvision.models.resnet50(weights=None)
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = None
    with torch.no_grad():
        net.train()
        net(torch.randn(4, 3, 128, 96))
    return net.eval()


def _flow_keys(prefix: str) -> dict[str, tuple[int, ...]]:
    """RealNVP of both references: 6 couplings, nets Linear(2,64)-LeakyReLU-Linear(64,64)-LeakyReLU-Linear(64,2)[-Tanh]."""
    keys = {f"{prefix}mask": (6, 2)}
    for net in ("t", "s"):
        for i in range(6):
            for j, (o, n) in zip((0, 2, 4), ((64, 2), (64, 64), (2, 64))):
                keys[f"{prefix}{net}.{i}.{j}.weight"] = (o, n)
                keys[f"{prefix}{net}.{i}.{j}.bias"] = (o,)
    return keys


def _random(keys: dict[str, tuple[int, ...]], seed: int, std: float = 0.05) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {k: torch.randn(s, generator=generator) * std for k, s in keys.items()}


def official_file(backbone: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The official ``RegressFlow.state_dict()`` (ResNet-50, ``NUM_FC_FILTERS: [-1]``): ``preact.*`` (its ResNet,
    torchvision's names), ``fc_coord.linear`` / ``fc_sigma.linear`` (``Linear(2048, 2K)``), ``flow.*``."""
    sd = {f"preact.{k}": v for k, v in backbone.state_dict().items() if not k.startswith("fc.")}
    sd.update(_random({"fc_coord.linear.weight": (2 * K, 2048), "fc_coord.linear.bias": (2 * K,),
                       "fc_sigma.linear.weight": (2 * K, 2048), "fc_sigma.linear.bias": (2 * K,)}, 1))
    flow = _random(_flow_keys("flow."), 2)
    flow["flow.mask"] = torch.tensor([[0.0, 1.0], [1.0, 0.0]] * 3)
    return {**sd, **flow}


def mmpose_file(backbone: torch.nn.Module, v1: bool) -> dict[str, torch.Tensor]:
    """mmpose's RLE model: ``backbone.*`` (ResNet), ``{keypoint_head|head}.fc`` (``Linear(2048, 4K)``) and the
    loss's ``RealNVP`` with its ``loc`` / ``cov`` prior buffers."""
    head, loss = ("head", "loss_module") if v1 else ("keypoint_head", "loss")
    sd = {f"backbone.{k}": v for k, v in backbone.state_dict().items() if not k.startswith("fc.")}
    sd.update(_random({f"{head}.fc.weight": (4 * K, 2048), f"{head}.fc.bias": (4 * K,)}, 3, std=0.01))  # mmpose's init
    flow = _random(_flow_keys(f"{head}.{loss}.flow_model."), 4)
    flow[f"{head}.{loss}.flow_model.mask"] = torch.tensor([[0.0, 1.0], [1.0, 0.0]] * 3)
    flow[f"{head}.{loss}.flow_model.loc"] = torch.zeros(2)
    flow[f"{head}.{loss}.flow_model.cov"] = torch.eye(2)
    return {**sd, **flow}


def _features(backbone: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """torchvision ResNet up to the global average pool: (B, 2048)."""
    return torch.nn.Sequential(*list(backbone.children())[:-1])(x).flatten(1)


@pytest.fixture(scope="module")
def backbone():
    return _calibrated_resnet50()


def _images(seed: int = 5) -> torch.Tensor:
    return torch.rand(2, 3, 256, 192, generator=torch.Generator().manual_seed(seed))


def _check_every_tensor(task: PoseTask, converted_sd: dict[str, torch.Tensor]) -> None:
    own = {**{f"model.{k}": v for k, v in task.model.state_dict().items()},
           **{f"flow.{k}": v for k, v in task.criterion.flow.state_dict().items()}}
    assert {k for k in own if not k.endswith("num_batches_tracked")} <= set(converted_sd)
    for key, value in own.items():
        if key in converted_sd:
            assert torch.equal(value, converted_sd[key]), key


def test_official_rle_file_loads_and_computes_as_the_reference(backbone, tmp_path):
    sd = official_file(backbone)
    torch.save(sd, tmp_path / "coco-laplace-rle.pth")
    task = PoseTask(pretrained_weights=str(tmp_path / "coco-laplace-rle.pth"), num_log_images=0,
                    channels_last=False).eval()
    assert task.hparams.coord_norm is True and task.hparams.input_normalization == "rle"
    converted = read_pose_weights(str(tmp_path / "coco-laplace-rle.pth"))
    assert len(converted.state_dict) == len(sd)
    _check_every_tensor(task, converted.state_dict)
    # the reference's forward: RGB in [0, 1] minus (0.406, 0.457, 0.480); ResNet; pool; Linear(norm=True); sigmoid
    images = _images()
    with torch.no_grad():
        feature = _features(backbone, images - torch.tensor([0.406, 0.457, 0.480])[:, None, None])
        coords = feature @ sd["fc_coord.linear.weight"].t() / feature.norm(dim=1, keepdim=True) + sd["fc_coord.linear.bias"]
        sigma = (feature @ sd["fc_sigma.linear.weight"].t() + sd["fc_sigma.linear.bias"]).sigmoid()
        out = task.model(images)
    diffs = {"coords": (out["coords"] - coords.view(2, K, 2)).abs().max().item(),
             "sigma": (out["sigma"] - sigma.view(2, K, 2)).abs().max().item()}
    print("official RLE: keys", len(sd), "mapped", len(converted.state_dict), "largest differences", diffs)
    assert max(diffs.values()) <= ATOL, diffs
    # the flow is the reference's: the same log-density at a few points (backward_p + standard normal)
    x = torch.randn(5, 2)
    z, log_det = x, torch.zeros(5)
    for i in reversed(range(6)):
        m = sd["flow.mask"][i]
        net = lambda name, v: _mlp(sd, f"flow.{name}.{i}.", v, tanh=name == "s")  # noqa: E731
        s_, t_ = net("s", m * z) * (1 - m), net("t", m * z) * (1 - m)
        z = (1 - m) * (z - t_) * torch.exp(-s_) + m * z
        log_det = log_det - s_.sum(1)
    expected = torch.distributions.MultivariateNormal(torch.zeros(2), torch.eye(2)).log_prob(z) + log_det
    torch.testing.assert_close(task.criterion.flow.log_prob(x), expected, rtol=0, atol=1e-5)


def _mlp(sd, prefix, x, tanh):
    h = torch.nn.functional.leaky_relu(x @ sd[prefix + "0.weight"].t() + sd[prefix + "0.bias"])
    h = torch.nn.functional.leaky_relu(h @ sd[prefix + "2.weight"].t() + sd[prefix + "2.bias"])
    h = h @ sd[prefix + "4.weight"].t() + sd[prefix + "4.bias"]
    return h.tanh() if tanh else h


@pytest.mark.parametrize("v1", [False, True])
def test_mmpose_rle_checkpoint_loads_and_decodes_as_mmpose(backbone, v1, tmp_path):
    sd = mmpose_file(backbone, v1)
    torch.save({"meta": {"mmpose_version": "0.26.0"}, "state_dict": sd}, tmp_path / "deeppose_res50_rle.pth")
    task = PoseTask(pretrained_weights=str(tmp_path / "deeppose_res50_rle.pth"), num_log_images=0,
                    channels_last=False).eval()
    assert task.hparams.coord_norm is False and task.hparams.input_normalization == "imagenet"
    converted = read_pose_weights(str(tmp_path / "deeppose_res50_rle.pth"))
    assert len(converted.state_dict) == len(sd) + 2 - 2  # fc weight / bias split in two Linears; loc / cov dropped
    _check_every_tensor(task, converted.state_dict)
    head = "head" if v1 else "keypoint_head"
    mean, std = torch.tensor([0.485, 0.456, 0.406])[:, None, None], torch.tensor([0.229, 0.224, 0.225])[:, None, None]
    images = _images()
    with torch.no_grad():
        raw = (_features(backbone, (images - mean) / std) @ sd[f"{head}.fc.weight"].t() + sd[f"{head}.fc.bias"]).view(2, K, 4)
        out = task.model(images)
    # mmpose decodes x = coords * W in [0, 1] of the crop; ours (coords + 0.5) * W
    diffs = {"coords": (out["coords"] + 0.5 - raw[..., :2]).abs().max().item(),
             "sigma": (out["sigma"] - raw[..., 2:].sigmoid()).abs().max().item()}
    print(f"mmpose {'1.x' if v1 else '0.x'} RLE: keys", len(sd), "mapped", len(converted.state_dict), diffs)
    assert max(diffs.values()) <= ATOL, diffs


def test_pose_weights_mismatches_and_l1(backbone, tmp_path):
    sd = official_file(backbone)
    torch.save(sd, tmp_path / "rle.pth")
    with pytest.raises(ValueError, match="input_normalization='rle' \\(given 'imagenet'\\)"):
        PoseTask(pretrained_weights=str(tmp_path / "rle.pth"), input_normalization="imagenet")
    with pytest.raises(ValueError, match="backbone='resnet50' \\(given 'resnet18'\\)"):
        PoseTask(pretrained_weights=str(tmp_path / "rle.pth"), backbone="resnet18")
    l1 = PoseTask(pretrained_weights=str(tmp_path / "rle.pth"), loss="l1", num_log_images=0)  # the flow is left out
    assert torch.equal(l1.model.fc_sigma.linear.bias, sd["fc_sigma.linear.bias"])
    torch.save({**sd, "fcs.0.weight": torch.zeros(1024, 2048)}, tmp_path / "hidden.pth")
    with pytest.raises(ValueError, match="map to nothing of ours: fcs.0.weight"):
        PoseTask(pretrained_weights=str(tmp_path / "hidden.pth"))
    with pytest.raises(ValueError, match="17 ?|shape"):
        PoseTask(num_keypoints=5, flip_index=[0, 2, 1, 4, 3], oks_sigmas=[0.05] * 5,
                 pretrained_weights=str(tmp_path / "rle.pth"))
    assert convert_pose_state_dict(sd).options["backbone"] == "resnet50"
