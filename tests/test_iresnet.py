"""insightface IResNet and MobileFaceNet: parameter counts, stage shapes, state-dict names and outputs against a
functional re-statement of arcface_torch's definitions (backbones/iresnet.py, backbones/mobilefacenet.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lit_tasks.models.face.iresnet import IRESNET_LAYERS, IResNet, build_iresnet
from lit_tasks.models.face.mobilefacenet import build_mobilefacenet


# ------------------------------------------------------------------ the reference, re-stated from arcface_torch


def reference_iresnet_count(layers, embedding: int = 512, side: int = 7) -> int:
    """Parameters of arcface_torch's IResNet, counted from its definition (the fixed-scale BN1d weight included)."""
    count = 3 * 64 * 9 + 2 * 64 + 64  # stem conv3x3, bn1, prelu
    inplanes = 64
    for planes, blocks in zip((64, 128, 256, 512), layers):
        for b in range(blocks):
            i = inplanes if b == 0 else planes
            count += 2 * i + i * planes * 9 + 2 * planes + planes + planes * planes * 9 + 2 * planes  # bn1 conv1 bn2 prelu conv2 bn3
            if b == 0:
                count += i * planes + 2 * planes  # downsample conv1x1 + bn (every stage starts with stride 2)
        inplanes = planes
    return count + 2 * 512 + 512 * side * side * embedding + embedding + 2 * embedding  # bn2, fc, features


def reference_iresnet_keys(layers) -> set[str]:
    """State-dict keys arcface_torch's IResNet saves."""
    def bn(p):
        return {f"{p}.{s}" for s in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")}

    keys = {"conv1.weight", "prelu.weight", "fc.weight", "fc.bias"} | bn("bn1") | bn("bn2") | bn("features")
    for n, blocks in enumerate(layers, start=1):
        for b in range(blocks):
            p = f"layer{n}.{b}"
            keys |= {f"{p}.conv1.weight", f"{p}.conv2.weight", f"{p}.prelu.weight"}
            keys |= bn(f"{p}.bn1") | bn(f"{p}.bn2") | bn(f"{p}.bn3")
            if b == 0:
                keys |= {f"{p}.downsample.0.weight"} | bn(f"{p}.downsample.1")
    return keys


def reference_iresnet_forward(sd: dict, images: torch.Tensor, layers) -> torch.Tensor:
    """arcface_torch IResNet.forward in eval mode, functional, on a state dict; input normalised as its dataset does."""
    def bn(x, p):
        return F.batch_norm(x, sd[f"{p}.running_mean"], sd[f"{p}.running_var"], sd[f"{p}.weight"], sd[f"{p}.bias"],
                            False, 0.0, 1e-5)

    x = (images - 0.5) / 0.5
    x = F.prelu(bn(F.conv2d(x, sd["conv1.weight"], padding=1), "bn1"), sd["prelu.weight"])
    for n, blocks in enumerate(layers, start=1):
        for b in range(blocks):
            p, stride = f"layer{n}.{b}", 2 if b == 0 else 1
            out = F.conv2d(bn(x, f"{p}.bn1"), sd[f"{p}.conv1.weight"], padding=1)
            out = F.prelu(bn(out, f"{p}.bn2"), sd[f"{p}.prelu.weight"])
            out = bn(F.conv2d(out, sd[f"{p}.conv2.weight"], stride=stride, padding=1), f"{p}.bn3")
            shortcut = bn(F.conv2d(x, sd[f"{p}.downsample.0.weight"], stride=stride), f"{p}.downsample.1") if b == 0 else x
            x = out + shortcut
    x = torch.flatten(bn(x, "bn2"), 1)
    return bn(F.linear(x, sd["fc.weight"], sd["fc.bias"]), "features")


def reference_mbf_forward(sd: dict, images: torch.Tensor, blocks, scale: int) -> torch.Tensor:
    """arcface_torch MobileFaceNet.forward in eval mode, functional."""
    def bn(x, p):
        return F.batch_norm(x, sd[f"{p}.running_mean"], sd[f"{p}.running_var"], sd[f"{p}.weight"], sd[f"{p}.bias"],
                            False, 0.0, 1e-5)

    def conv_block(x, p, stride=1, padding=0, groups=1, act=True):
        y = bn(F.conv2d(x, sd[f"{p}.layers.0.weight"], stride=stride, padding=padding, groups=groups), f"{p}.layers.1")
        return F.prelu(y, sd[f"{p}.layers.2.weight"]) if act else y

    def depthwise(x, p, stride, groups, residual):
        y = conv_block(x, f"{p}.layers.0")
        y = conv_block(y, f"{p}.layers.1", stride=stride, padding=1, groups=groups)
        y = conv_block(y, f"{p}.layers.2", act=False)
        return x + y if residual else y

    def residual(x, p, n, groups):
        for b in range(n):
            x = depthwise(x, f"{p}.layers.{b}", 1, groups, True)
        return x

    x = conv_block((images - 0.5) / 0.5, "layers.0", stride=2, padding=1)
    x = conv_block(x, "layers.1", padding=1, groups=64) if blocks[0] == 1 else residual(x, "layers.1", blocks[0], 128)
    x = residual(depthwise(x, "layers.2", 2, 128, False), "layers.3", blocks[1], 128)
    x = residual(depthwise(x, "layers.4", 2, 256, False), "layers.5", blocks[2], 256)
    x = residual(depthwise(x, "layers.6", 2, 512, False), "layers.7", blocks[3], 256)
    x = conv_block(x, "conv_sep")
    x = conv_block(x, "features.layers.0", groups=512, act=False).flatten(1)
    return bn(F.linear(x, sd["features.layers.2.weight"]), "features.layers.3")


def randomise_(model: torch.nn.Module, seed: int) -> None:
    """Well-conditioned random weights and BN statistics, so an eval-mode comparison is informative."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if not t.is_floating_point():
                continue
            if t.ndim >= 2:  # conv / linear weights: variance-preserving scale
                fan_in = t[0].numel()
                t.copy_(torch.randn(t.shape, generator=g) * (1.0 / fan_in) ** 0.5)
            elif name.endswith("running_var"):
                t.copy_(torch.rand(t.shape, generator=g) + 0.5)
            elif name.endswith("weight"):  # BN scales, PReLU slopes
                t.copy_(torch.rand(t.shape, generator=g) * 0.5 + 0.5)
            else:  # biases, running means
                t.copy_(torch.randn(t.shape, generator=g) * 0.1)


# ------------------------------------------------------------------------------------------------- IResNet


@pytest.mark.parametrize("name", ["iresnet18", "iresnet34", "iresnet50", "iresnet100", "iresnet200"])
def test_parameter_count_and_names_equal_the_reference(name):
    model = build_iresnet(name)
    count = sum(p.numel() for p in model.parameters())
    assert count == reference_iresnet_count(IRESNET_LAYERS[name])
    assert set(model.state_dict()) == reference_iresnet_keys(IRESNET_LAYERS[name])  # arcface_torch checkpoints load
    assert not model.features.weight.requires_grad and torch.all(model.features.weight == 1)
    if name == "iresnet50":
        # The figure: 43.6 M parameters with a 512-d embedding (25.7 M of them in the FC).
        assert round(count / 1e6, 1) == 43.6 and model.fc.weight.numel() == 512 * 49 * 512


def test_stage_shapes_and_embedding_shape():
    model = build_iresnet("r50", channels_last=False).eval()
    images = torch.rand(2, 3, 112, 112, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        shapes = [tuple(f.shape) for f in model.forward_features(images)]
        assert shapes == [(2, 64, 112, 112), (2, 64, 56, 56), (2, 128, 28, 28), (2, 256, 14, 14), (2, 512, 7, 7)]
        assert model(images).shape == (2, 512)
    assert build_iresnet("iresnet18", embedding_size=128).fc.out_features == 128
    with pytest.raises(ValueError, match="unknown IResNet 'iresnet19'"):
        build_iresnet("iresnet19")
    with pytest.raises(ValueError, match=r"takes \(B, 3, 112, 112\)"):
        model(torch.rand(1, 3, 96, 96))


@pytest.mark.parametrize("channels_last", [False, True])
def test_forward_equals_the_reference_definition(channels_last):
    model = build_iresnet("iresnet18", channels_last=channels_last)
    randomise_(model, 1)
    model.eval()
    images = torch.rand(2, 3, 112, 112, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ours = model(images)
        reference = reference_iresnet_forward(model.state_dict(), images, IRESNET_LAYERS["iresnet18"])
    # float32; each output sums ~25k products of O(1) terms through ~20 layers: ~1e-5 relative.
    scale = reference.abs().max()
    assert torch.allclose(ours, reference, rtol=0, atol=1e-4 * float(scale)), float((ours - reference).abs().max())
    # Loading its own state dict into a fresh network (strict) reproduces it: names and shapes line up.
    twin = build_iresnet("iresnet18", channels_last=not channels_last)
    twin.load_state_dict(model.state_dict(), strict=True)
    with torch.no_grad():
        assert torch.allclose(twin.eval()(images), ours, atol=1e-4 * float(scale))


def test_bf16_autocast_gives_finite_float32_embeddings_and_gradients():
    # bf16 convolutions are slow on CPUs without bf16 units: one 112 px image forward, gradients on a 32 px twin.
    model = build_iresnet("iresnet18")
    randomise_(model, 3)
    model.eval()
    images = torch.rand(1, 3, 112, 112, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        full = model(images)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            mixed = model(images)
            body = model.forward_features(torch.rand(1, 3, 112, 112))[1]
    assert body.dtype == torch.bfloat16  # the body follows the caller's autocast
    assert mixed.dtype == torch.float32 and mixed.shape == (1, 512) and torch.isfinite(mixed).all()  # head in fp32
    # bf16 keeps 8 mantissa bits (0.4 % per rounding); ~20 layers of them: a few % relative, far from random.
    assert F.cosine_similarity(mixed, full, dim=1).min() > 0.98

    small = build_iresnet("iresnet18", image_size=32)  # insightface's own initialisation, training mode
    assert small.feature_size == 2 and small.fc.in_features == 512 * 4
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = small(torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(4)))
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    out.pow(2).mean().backward()
    grads = [p.grad for p in small.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert small.features.weight.grad is None  # the fixed BN1d scale does not train


def test_dropout_is_applied_before_the_fc_in_training_only():
    model = build_iresnet("iresnet18", dropout=0.5)
    assert model.dropout.p == 0.5
    images = torch.rand(2, 3, 112, 112, generator=torch.Generator().manual_seed(4))
    model.eval()
    with torch.no_grad():
        a, b = model(images), model(images)
    assert torch.equal(a, b)
    model.train()
    torch.manual_seed(0)
    with torch.no_grad():
        c = model(images)
    torch.manual_seed(1)
    with torch.no_grad():
        d = model(images)
    assert not torch.allclose(c, d)


# --------------------------------------------------------------------------------------------- MobileFaceNet


@pytest.mark.parametrize("name,blocks,scale", [("mbf", (1, 4, 6, 2), 2), ("mbf_large", (2, 8, 12, 4), 4)])
def test_mobilefacenet_equals_the_reference_definition(name, blocks, scale):
    model = build_mobilefacenet(name)
    randomise_(model, 5)
    model.eval()
    images = torch.rand(2, 3, 112, 112, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        ours = model(images)
        reference = reference_mbf_forward(model.state_dict(), images, blocks, scale)
    assert ours.shape == (2, 512)
    assert torch.allclose(ours, reference, rtol=0, atol=1e-4 * float(reference.abs().max()))
    # Every parameter is used by the re-statement (it reads each weight by its insightface name).
    used = {k for k in model.state_dict() if k.endswith(("weight", "bias"))}
    assert all(("layers" in k or k.startswith(("conv_sep", "features"))) for k in used)


def test_mobilefacenet_parameter_count():
    """Counted from the definition: stem, the groups=64 conv, DepthWise blocks (1x1 expand, depthwise 3x3, 1x1 project), GDC."""
    def conv_block(i, o, k=1, groups=1, act=True):
        return i // groups * o * k * k + 2 * o + (o if act else 0)

    def depthwise(i, o, g):
        return conv_block(i, g) + conv_block(g, g, 3, groups=g) + conv_block(g, o, act=False)

    expected = conv_block(3, 128, 3) + conv_block(128, 128, 3, groups=64) + depthwise(128, 128, 128) + 4 * depthwise(128, 128, 128)
    expected += depthwise(128, 256, 256) + 6 * depthwise(256, 256, 256) + depthwise(256, 256, 512) + 2 * depthwise(256, 256, 256)
    expected += conv_block(256, 512) + conv_block(512, 512, 7, groups=512, act=False) + 512 * 512 + 2 * 512
    model = build_mobilefacenet("mbf")
    assert sum(p.numel() for p in model.parameters()) == expected
    with pytest.raises(ValueError, match="unknown MobileFaceNet"):
        build_mobilefacenet("mbf_tiny")


def test_mobilefacenet_bf16_autocast_is_finite():
    model = build_mobilefacenet("mbf")
    images = torch.rand(2, 3, 112, 112, generator=torch.Generator().manual_seed(7))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(images)
    assert out.dtype == torch.float32 and out.shape == (2, 512) and torch.isfinite(out).all()


@pytest.mark.parametrize("build", [lambda: build_iresnet("iresnet18", image_size=32, fp16=True),
                                   lambda: build_mobilefacenet("mbf", image_size=32, fp16=True)])
def test_fp16_flag_runs_the_body_in_float16_and_the_head_in_float32(build):
    """insightface's ``fp16=True``: autocast float16 around the body only (here on CPU, 32 px inputs to stay fast)."""
    model = build()
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(8))
    if hasattr(model, "forward_features"):
        assert model.forward_features(images)[-1].dtype == torch.float16
    out = model(images)
    assert out.dtype == torch.float32 and out.shape == (2, 512) and torch.isfinite(out).all()
    out.pow(2).mean().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("build", [lambda: build_iresnet("iresnet18", image_size=32),
                                   lambda: build_mobilefacenet("mbf", image_size=32)])
def test_traces_and_exports_to_onnx_like_the_timm_embedding_network(build, tmp_path):
    """The face task exports ``NormalisedEmbedder(network)`` by tracing (TorchScript) and to ONNX: both must hold."""
    ort = pytest.importorskip("onnxruntime")
    from lit_tasks.models.face.embedding import NormalisedEmbedder

    model = build()
    randomise_(model, 9)
    embedder = NormalisedEmbedder(model.eval(), flip=True).eval()
    example = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(9))
    other = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(10))  # another batch size
    with torch.no_grad():
        expected = embedder(other)
        traced = torch.jit.trace(embedder, example)
        assert torch.allclose(traced(other), expected, atol=1e-5)
        torch.onnx.export(embedder, example, str(tmp_path / "net.onnx"), input_names=["images"], output_names=["embeddings"],
                          dynamic_axes={"images": {0: "batch"}, "embeddings": {0: "batch"}}, opset_version=17, dynamo=False)
    session = ort.InferenceSession(str(tmp_path / "net.onnx"), providers=["CPUExecutionProvider"])
    got = session.run(None, {"images": other.numpy()})[0]
    assert got.shape == (3, 512) and np.allclose(got, expected.numpy(), atol=1e-4)
