"""Convert published DETR weights (facebookresearch/detr or Hugging Face) to lit_tasks' DETR, from a local file.

    python tools/convert_detr.py detr-r50-e632da11.pth detr_r50_lit.pt
    python tools/convert_detr.py model.safetensors detr_r50_lit.pt                      # Hugging Face files
    python tools/convert_detr.py detr-r50-e632da11.pth detr_r50_coco80.pt --class_rows 1,2,3,...,90
    python tools/convert_detr.py detr-r50-e632da11.pth detr_r50_mine.pt --num_classes 5 --reinit_class_head

Sizes (d_model, queries, layers, FFN width, classes, position embedding) are read from the checkpoint; the
backbone is recognised for ResNet-50 / 101 (else give ``--backbone``); DC5 (``--dilation``) and the number of
heads (``--nheads``, 8 in every published model) are not stored and must be given. The model is built, the
weights are loaded strictly (every key matched both ways, see ``lit_tasks.models.detection.detr_convert``) and saved as
``{"state_dict": ..., "build_detr": {...}}``: ``build_detr(**saved["build_detr"])`` rebuilds the network and
``load_state_dict(saved["state_dict"])`` fills it. Nothing is downloaded; an existing output is not overwritten
without ``--overwrite``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

import torch

from lit_tasks.models.detection.detr import build_detr
from lit_tasks.models.detection.detr_convert import convert_detr_state_dict, infer_detr_config, load_detr_weights, read_checkpoint

_RESNETS = {(3, 4, 6, 3): "resnet50", (3, 4, 23, 3): "resnet101"}


def guess_backbone(state_dict: dict[str, torch.Tensor]) -> str | None:
    """``resnet50`` / ``resnet101`` from the number of blocks per stage of a bottleneck ResNet, else None."""
    blocks = tuple(len({k.split(".")[2] for k in state_dict if k.startswith(f"backbone.layer{s}.")}) for s in range(1, 5))
    bottleneck = any(k.startswith("backbone.layer1.0.conv3.") for k in state_dict)
    return _RESNETS.get(blocks) if bottleneck else None


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("source", help="facebookresearch .pth, Hugging Face model.safetensors / pytorch_model.bin")
    parser.add_argument("output", help="where to write the converted weights (.pt)")
    parser.add_argument("--backbone", help="timm name of the backbone (default: recognised from the weights)")
    parser.add_argument("--dilation", action="store_true", help="a DC5 model (dilated last stage)")
    parser.add_argument("--nheads", type=int, default=8, help="attention heads (not stored in the weights)")
    parser.add_argument("--num_classes", type=int, help="classes of the converted model (default: the checkpoint's)")
    parser.add_argument("--class_rows", help="comma-separated checkpoint class rows, one per class of ours")
    parser.add_argument("--reinit_class_head", action="store_true",
                        help="keep everything but the class head, which starts untrained (new classes)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> Path:
    args = parse_args(argv)
    output = Path(args.output)
    if output.exists() and not args.overwrite:
        raise SystemExit(f"{output} exists; pass --overwrite to replace it")
    state_dict = convert_detr_state_dict(read_checkpoint(args.source))
    config = infer_detr_config(state_dict)
    class_rows = [int(r) for r in args.class_rows.split(",")] if args.class_rows else None
    num_classes = args.num_classes if args.num_classes is not None else (
        len(class_rows) if class_rows is not None else config["num_classes"])
    backbone = args.backbone or guess_backbone(state_dict)
    if backbone is None:
        raise SystemExit(f"{args.source}: backbone not recognised as ResNet-50 / 101; pass --backbone (timm name)")
    build_args = dict(config, num_classes=num_classes, backbone=backbone, dilation=args.dilation, nheads=args.nheads)
    model, _, _ = build_detr(**build_args)
    load_detr_weights(model, state_dict, class_rows=class_rows, reinit_class_head=args.reinit_class_head)
    output.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": model.state_dict(), "build_detr": build_args}, output)
    head = "re-initialised" if args.reinit_class_head else ("rows " + args.class_rows if class_rows else "as stored")
    print(f"{args.source} -> {output}: {build_args}; class head {head}")
    return output


if __name__ == "__main__":
    main(sys.argv[1:])
