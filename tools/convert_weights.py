"""Convert a published weights file once, for ``--model.pretrained_weights`` of any task (offline, local files only).

    python tools/convert_weights.py detection fcos_resnet50_fpn_coco-99b0c9b7.pth fcos_r50_coco80.pt --class_rows coco
    python tools/convert_weights.py detection vfnet_r50_fpn_1x_coco_20201027-38db6f58.pth vfnet_r50.pt
    python tools/convert_weights.py detection detr-r50-e632da11.pth detr_r50.pt          # DETR: tools/convert_detr.py
    python tools/convert_weights.py segmentation deeplabv3_resnet50_coco-cd0a2569.pth deeplabv3_r50.pt
    python tools/convert_weights.py face ms1mv3_arcface_r50_fp16/backbone.pth arcface_r50.pt
    python tools/convert_weights.py pose coco-laplace-rle.pth rle_r50.pt
    python tools/convert_weights.py action checkpoint_thumos_anet.pth oadtr_thumos.pt

The first argument is the task family; the source's layout is recognised from its key names (each family's
``lit_tasks/models/<family>/convert.py`` lists the layouts and the key mapping). The output is ``{"state_dict": ours,
"lit_tasks_weights": {"task", "source", "options", "class_head", "reference_eval"}}``: the options are the task
arguments the weights need (set from the file when left at None, an error naming them when given otherwise), the
reference's evaluation settings are recorded. Every task also takes the published file directly: converting once
only saves the conversion at each start, or cuts the class head (``--class_rows``).

``--class_rows`` keeps the file's class-head rows in this order (``coco``: the 80 COCO category ids, for heads indexed
by category id, as torchvision's and DETR's COCO models). Nothing is downloaded; an existing output is kept unless
``--overwrite``.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path
from typing import Callable, Sequence

FAMILIES = ("detection", "segmentation", "face", "pose", "action")


def reader(family: str) -> Callable:
    """The family's ``read_*_weights(path) -> Converted``."""
    if family == "detection":
        from lit_tasks.models.detection.convert import read_detection_weights

        return read_detection_weights
    if family == "segmentation":
        from lit_tasks.models.segmentation.convert import read_segmentation_weights

        return read_segmentation_weights
    if family == "face":
        from lit_tasks.models.face.convert import read_face_weights

        return read_face_weights
    if family == "pose":
        from lit_tasks.models.pose.convert import read_pose_weights

        return read_pose_weights
    from lit_tasks.models.action.convert import read_action_weights

    return read_action_weights


def class_rows(text: str | None) -> list[int] | None:
    if not text:
        return None
    if text == "coco":
        from lit_tasks.models.detection.convert import COCO_CATEGORY_IDS

        return list(COCO_CATEGORY_IDS)
    return [int(r) for r in text.split(",")]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("family", choices=FAMILIES, help="the task the weights are for")
    parser.add_argument("source", help="the published file (.pth / .pt / .bin / .safetensors)")
    parser.add_argument("output", help="where to write the converted weights (.pt)")
    parser.add_argument("--class_rows", help="'coco' or comma-separated rows of the file's class head to keep")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    detr = parser.add_argument_group("DETR (forwarded to tools/convert_detr.py)")
    detr.add_argument("--backbone", help="timm name of the backbone (default: recognised from the weights)")
    detr.add_argument("--dilation", action="store_true", help="a DC5 model (dilated last stage)")
    detr.add_argument("--nheads", type=int, default=8, help="attention heads (not stored in the weights)")
    detr.add_argument("--num_classes", type=int, help="classes of the converted model")
    detr.add_argument("--reinit_class_head", action="store_true", help="a new, untrained class head")
    return parser.parse_args(argv)


def _convert_detr(args: argparse.Namespace) -> Path:
    spec = importlib.util.spec_from_file_location("convert_detr", Path(__file__).with_name("convert_detr.py"))
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    argv = [args.source, args.output, "--nheads", str(args.nheads)]
    rows = class_rows(args.class_rows)
    argv += ["--class_rows", ",".join(map(str, rows))] if rows else []
    argv += ["--backbone", args.backbone] if args.backbone else []
    argv += ["--num_classes", str(args.num_classes)] if args.num_classes is not None else []
    argv += [flag for flag, on in (("--dilation", args.dilation), ("--reinit_class_head", args.reinit_class_head),
                                   ("--overwrite", args.overwrite)) if on]
    return tool.main(argv)


def main(argv: Sequence[str] | None = None) -> Path:
    from lit_tasks.models.published import read_file, save_converted, select_class_rows, state_dict_of

    args = parse_args(argv)
    output = Path(args.output)
    if output.exists() and not args.overwrite:
        raise SystemExit(f"{output} exists; pass --overwrite to replace it")
    if args.family == "detection":
        from lit_tasks.models.detection.convert import detect_detection_layout

        if detect_detection_layout(state_dict_of(read_file(args.source), args.source)) == "detr":
            return _convert_detr(args)
    converted = reader(args.family)(args.source)
    rows = class_rows(args.class_rows)
    if rows is not None:
        if not converted.class_head:
            raise SystemExit(f"{args.source}: {converted.source} has no class head to cut")
        converted.state_dict = select_class_rows(converted.state_dict, converted.class_head, rows)
    save_converted(converted, args.family, output)
    head = f"; class head rows {args.class_rows}" if rows is not None else ""
    print(f"{args.source} ({converted.source}) -> {output}: {len(converted.state_dict)} tensors; options "
          f"{converted.options}{head}; the reference evaluates with {converted.reference_eval or 'defaults'}")
    return output


if __name__ == "__main__":
    main(sys.argv[1:])
