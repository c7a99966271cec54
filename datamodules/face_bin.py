"""insightface verification sets (``lfw.bin``, ``cfp_fp.bin``, ``agedb_30.bin``, ...) read without running their pickle.

A ``.bin`` is a pickle of the tuple ``(bins, issame_list)``: ``bins`` the encoded images (JPEG/PNG bytes),
``issame_list`` one flag per pair; pair ``i`` is ``bins[2 * i]`` and ``bins[2 * i + 1]`` (insightface
``recognition/arcface_torch/eval/verification.py`` ``load_bin``). The released files were pickled by Python 2
(protocol 2, images as ``str``), which Python 3's default ``pickle.load`` cannot decode (insightface issue #70).

Loading never runs code from the file: :class:`SafeBinUnpickler` refuses every global the pickle names except
the few constructors such files can legitimately need, none of which executes anything:

* ``_codecs.encode`` with the ``latin1`` codec only: how Python 3 pickles ``bytes`` at protocol 2;
* ``builtins.bytearray`` / ``builtins.bytes``: images stored as bytearrays;
* numpy's ``_reconstruct`` / ``ndarray`` / ``dtype`` / ``scalar`` (under ``numpy.core`` and ``numpy._core``):
  images kept as the ``uint8`` arrays ``cv2.imencode`` returns, flags as ``numpy.bool_``; dtypes holding
  Python objects are refused, so an array cannot smuggle in arbitrary objects.

Anything else (``os.system``, ``builtins.eval``, any class) raises :class:`RefusedPickleError` (a
:class:`pickle.UnpicklingError`) naming the file and the refused global, before it is called. Python 2 strings are read as latin-1 text and turned back
into the identical bytes.
"""

from __future__ import annotations

import codecs
import os
import pickle
from pathlib import Path
from typing import Any, Callable

import numpy as np


class RefusedPickleError(pickle.UnpicklingError):
    """The pickle names a global (function, class) that a verification ``.bin`` has no business holding."""


def _latin1_encode(text: str, encoding: str = "latin1", *args: Any) -> bytes:
    """``_codecs.encode`` restricted to latin-1, the only codec Python 3 uses to pickle ``bytes`` at protocol < 3."""
    if codecs.lookup(encoding).name != "iso8859-1" or args:
        raise RefusedPickleError(f"refusing _codecs.encode with codec {encoding!r}: only latin1 is allowed")
    return codecs.encode(text, "latin1")


def _plain_dtype(*args: Any, **kwargs: Any) -> np.dtype:
    dtype = np.dtype(*args, **kwargs)
    if dtype.hasobject:
        raise RefusedPickleError(f"refusing numpy dtype {dtype}: it holds Python objects")
    return dtype


def _numpy_globals() -> dict[tuple[str, str], Any]:
    try:  # numpy >= 2 (numpy.core is a deprecated alias there); pickles name either module
        from numpy._core.multiarray import _reconstruct, scalar
    except ImportError:  # numpy 1.x
        from numpy.core.multiarray import _reconstruct, scalar

    allowed = {}
    for module in ("numpy.core.multiarray", "numpy._core.multiarray"):
        allowed[(module, "_reconstruct")] = _reconstruct
        allowed[(module, "scalar")] = scalar
    allowed[("numpy", "ndarray")] = np.ndarray
    allowed[("numpy", "dtype")] = _plain_dtype
    return allowed


class SafeBinUnpickler(pickle.Unpickler):
    """A :class:`pickle.Unpickler` whose ``find_class`` returns only the constructors listed in the module docstring."""

    def __init__(self, file: Any, name: str, **kwargs: Any) -> None:
        super().__init__(file, **kwargs)
        self.name = name
        self.allowed: dict[tuple[str, str], Any] = {
            ("_codecs", "encode"): _latin1_encode,
            ("builtins", "bytearray"): bytearray,
            ("builtins", "bytes"): bytes,
            ("__builtin__", "bytearray"): bytearray,  # Python 2 module name
        }
        self.allowed.update(_numpy_globals())

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self.allowed[(module, name)]
        except KeyError:
            raise RefusedPickleError(f"{self.name}: refusing to load {module}.{name}: a verification .bin holds only "
                                         "encoded images and same/different flags") from None


def _as_bytes(item: Any, where: str) -> bytes:
    if isinstance(item, (bytes, bytearray)):
        return bytes(item)
    if isinstance(item, str):  # a Python 2 str read as latin-1: code points 0..255 are the original bytes
        return item.encode("latin1")
    if isinstance(item, np.ndarray) and item.dtype == np.uint8 and item.ndim <= 2:
        return item.tobytes()
    raise ValueError(f"{where}: expected encoded image bytes, got {type(item).__name__}")


def _as_flag(item: Any, where: str) -> bool:
    if isinstance(item, (bool, np.bool_)) or (isinstance(item, (int, np.integer)) and item in (0, 1)):
        return bool(item)
    raise ValueError(f"{where}: expected a bool same/different flag, got {item!r}")


def load_bin(path: str | os.PathLike) -> tuple[list[bytes], np.ndarray]:
    """``(images, issame)`` of an insightface ``.bin``: ``2 P`` encoded images and ``(P,)`` bool flags.

    Raises:
        RefusedPickleError: the pickle names a global other than the allowed ones (nothing of it was run).
        pickle.UnpicklingError: the file is not a (complete) pickle.
        ValueError: the object is not ``(images, flags)``, an item has the wrong type, or the image count is
            not twice the pair count (the message names the file and what it found).
    """
    name = str(path)
    with open(path, "rb") as f:
        try:
            obj = SafeBinUnpickler(f, name, encoding="latin1").load()
        except RefusedPickleError as err:
            raise RefusedPickleError(str(err) if str(err).startswith(name) else f"{name}: {err}") from None
        except Exception as err:  # truncated or not a pickle at all
            raise pickle.UnpicklingError(f"{name}: not a readable pickle: {type(err).__name__}: {err}") from err
    if not isinstance(obj, (tuple, list)) or len(obj) != 2:
        raise ValueError(f"{name}: expected the pair (images, issame_list), got {type(obj).__name__}"
                         + (f" of length {len(obj)}" if isinstance(obj, (tuple, list)) else ""))
    bins, flags = obj
    if not isinstance(bins, (list, tuple)) or not isinstance(flags, (list, tuple, np.ndarray)):
        raise ValueError(f"{name}: expected lists (images, issame_list), got ({type(bins).__name__}, {type(flags).__name__})")
    if len(bins) != 2 * len(flags):
        raise ValueError(f"{name}: {len(bins)} images for {len(flags)} pairs; a verification .bin holds two images per pair")
    images = [_as_bytes(item, f"{name}: image {n}") for n, item in enumerate(bins)]
    issame = np.fromiter((_as_flag(f, f"{name}: pair {n}") for n, f in enumerate(flags)), dtype=bool, count=len(flags))
    return images, issame


class VerificationBinDataset:
    """Map-style pairs of a ``.bin``: ``dataset[i] -> {"image_a", "image_b", "same", "index"}``.

    ``image_a`` / ``image_b`` are images ``2 i`` and ``2 i + 1`` as ``decode`` gives them (the face family passes
    :func:`datamodules.images.decode_image`: ``(H, W, 3)`` uint8 RGB; without a decoder, the encoded bytes), each
    passed through ``transform`` if given; ``same`` a bool, ``index`` the pair number. The encoded images stay in
    memory (as insightface's ``load_bin`` does; LFW is ~60 MB); they are decoded per item, in the DataLoader
    workers. Unlike ``load_bin``, images are not resized: a transform does that if the file's images are not the
    network's size.

    Args:
        path: the ``.bin`` file.
        transform: called on each decoded image.
        decode: ``(encoded bytes, where) -> image``, ``where`` naming the file and image number for its errors.

    Attributes:
        name: the set's name, the file stem (``lfw``, ``cfp_fp``), for metric keys such as ``val/lfw/accuracy``.
        images: the ``2 P`` encoded images; ``issame``: ``(P,)`` bool.
    """

    def __init__(self, path: str | os.PathLike, transform: Callable[[np.ndarray], Any] | None = None, *,
                 decode: Callable[[bytes, str], Any] | None = None) -> None:
        self.path = str(path)
        self.name = Path(path).stem
        self.images, self.issame = load_bin(path)
        self.transform, self.decode = transform, decode

    def __len__(self) -> int:
        return len(self.issame)

    def image(self, n: int) -> Any:
        """Image ``n`` (of ``2 P``) as ``decode`` gives it (its encoded bytes without a decoder), before ``transform``."""
        if self.decode is None:
            return self.images[n]
        return self.decode(self.images[n], f"{self.path}: image {n}")

    def __getitem__(self, i: int) -> dict[str, Any]:
        if not -len(self) <= i < len(self):
            raise IndexError(f"pair {i} out of range for {len(self)} pairs in {self.path}")
        i %= len(self)
        a, b = self.image(2 * i), self.image(2 * i + 1)
        if self.transform is not None:
            a, b = self.transform(a), self.transform(b)
        return {"image_a": a, "image_b": b, "same": bool(self.issame[i]), "index": i}
