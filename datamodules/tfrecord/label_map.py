"""TF Object Detection API label maps (``label_map.pbtxt``): the class ids and names a set of shards uses.

Shards store label-map ids (COCO category ids for shards made from COCO, as the OD API does); sorted by
id they give the contiguous labels ``0 .. num_classes - 1``.
"""

from __future__ import annotations

import os
import re
from typing import Sequence


def write_label_map(path: str, ids: Sequence[int], names: Sequence[str]) -> None:
    """A TF OD API ``label_map.pbtxt``: one ``item { id: N name: '...' }`` per class."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for cid, name in zip(ids, names):
            escaped = str(name).replace("\\", "\\\\").replace("'", "\\'")
            f.write(f"item {{\n  id: {int(cid)}\n  name: '{escaped}'\n}}\n")


_ITEM = re.compile(r"item\s*\{(.*?)\}", re.S)
_FIELD = re.compile(r"""(\w+)\s*:\s*(?:(-?\d+)|'((?:[^'\\]|\\.)*)'|"((?:[^"\\]|\\.)*)")""")


def read_label_map(path: str) -> tuple[list[int], list[str]]:
    """``(ids, names)`` from a TF OD API ``label_map.pbtxt``, sorted by id (``display_name`` wins over ``name``)."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    items: dict[int, str] = {}
    for number, body in enumerate(_ITEM.findall(text)):
        fields = {}
        for key, integer, single, double in _FIELD.findall(body):
            fields[key] = int(integer) if integer else re.sub(r"\\(.)", r"\1", single or double)
        if "id" not in fields:
            raise ValueError(f"{path}: item {number} has no id")
        if fields["id"] in items:
            raise ValueError(f"{path}: item {number} repeats id {fields['id']}")
        items[fields["id"]] = str(fields.get("display_name", fields.get("name", fields["id"])))
    if not items:
        raise ValueError(f"{path}: no 'item {{ id: ... }}' entries; not a label map")
    ids = sorted(items)
    return ids, [items[i] for i in ids]
