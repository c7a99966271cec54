"""Image files and encoded bytes -> upright ``(H, W, 3)`` uint8 RGB: the one image decoder of every DataModule.

A camera held sideways stores the picture sideways and an EXIF orientation tag (0x0112) that viewers
apply. COCO's ``height``/``width`` and every labelling tool refer to the image as displayed, so boxes,
keypoints and masks are in upright pixels: ``decode_image`` applies the tag (the transposes of
``PIL.ImageOps.exif_transpose``) and ``image_header`` reports the upright size. Folder, COCO and
TFRecord readers all decode through here, so a file and its TFRecord copy give the same pixels.

Masks are class-id arrays, not photos: ``datamodules.segmentation.samples.read_mask`` reads them as stored and refuses
one that carries an orientation tag of its own.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import BinaryIO, Union

import numpy as np
from PIL import Image

ImageSource = Union[str, os.PathLike, bytes, bytearray, memoryview, BinaryIO]

# torchvision ImageFolder's list: the raster formats a dataset folder holds, all decoded by Pillow itself.
IMAGE_EXTENSIONS: frozenset[str] = frozenset({".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff",
                                               ".webp"})

ORIENTATION_TAG = 0x0112
# EXIF orientation -> the transpose that shows the image upright (PIL.ImageOps.exif_transpose's table).
UPRIGHT = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
SWAPS_SIDES = frozenset({5, 6, 7, 8})  # orientations whose upright image is W x H


def is_image_file(path: Path) -> bool:
    """True for a file with one of ``IMAGE_EXTENSIONS`` (any case)."""
    return path.suffix.lower() in IMAGE_EXTENSIONS and path.is_file()


def list_images(folder: str | Path) -> list[Path]:
    """Image files directly in ``folder``, sorted by name."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder {folder} does not exist")
    return sorted(p for p in folder.iterdir() if is_image_file(p))


def exif_orientation(image: Image.Image) -> int:
    """The EXIF orientation (1-8) of an open image; 1 (as stored) when absent or out of range."""
    value = image.getexif().get(ORIENTATION_TAG, 1)
    return value if value in UPRIGHT else 1


def _open(source: ImageSource, name: str | None) -> tuple[str | BinaryIO, str]:
    """What ``Image.open`` takes, and the name errors use (``name``, else the path, else ``"image bytes"``)."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        return io.BytesIO(source), name or "image bytes"
    if isinstance(source, (str, os.PathLike)):
        return os.fspath(source), name or os.fspath(source)
    return source, name or str(getattr(source, "name", "image stream"))


def decode_image(source: ImageSource, name: str | None = None) -> np.ndarray:
    """``(H, W, 3)`` uint8 RGB, upright, of an image file, encoded bytes or a binary file object.

    Greyscale, palette and alpha images become RGB; the EXIF orientation tag is applied, so ``H, W`` are
    the displayed image's. The array is writable and owns its memory (``np.asarray`` of a Pillow image is a
    read-only view of a bytes object, which in-place augmentations and ``torch.from_numpy`` refuse or warn
    about; the extra copy costs microseconds at face sizes against the milliseconds of decoding).

    Raises:
        OSError: ``"cannot read image NAME: <the decoder's reason>"``; ``name`` (a record or feature key)
            defaults to the path.
    """
    handle, where = _open(source, name)
    try:
        with Image.open(handle) as image:
            image.load()  # first, as exif_transpose does: some readers (TIFF) apply the tag while loading
            upright = UPRIGHT.get(exif_orientation(image))
            rgb = image if image.mode == "RGB" else image.convert("RGB")  # convert() of RGB would copy it
            return np.array(rgb if upright is None else rgb.transpose(upright))
    except (OSError, ValueError, SyntaxError, EOFError) as err:
        raise OSError(f"cannot read image {where}: {err}") from err


def image_header(source: ImageSource, name: str | None = None) -> tuple[int, int, str]:
    """``(height, width, format)`` of an image as displayed (EXIF orientation applied); ``format`` lower case.

    JPEG and WebP are read from the header only; a PNG is decoded when its EXIF chunk may follow the
    pixels, a TIFF because Pillow's TIFF reader applies the tag itself while loading.

    Raises:
        OSError: naming the image, as ``decode_image``.
    """
    handle, where = _open(source, name)
    try:
        with Image.open(handle) as image:
            if image.format == "TIFF":
                image.load()  # upright now, and the tag removed
            width, height = image.size
            if exif_orientation(image) in SWAPS_SIDES:
                width, height = height, width
            return height, width, (image.format or "").lower()
    except (OSError, ValueError, SyntaxError, EOFError) as err:
        raise OSError(f"cannot read image {where}: {err}") from err
