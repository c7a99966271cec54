"""insightface verification .bin files: golden lfw.bin (Python 2 pickle) and lfw_py3.bin, other legitimate encodings, refusals."""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import shlex
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from datamodules.face_bin import RefusedPickleError, SafeBinUnpickler, VerificationBinDataset, load_bin
from datamodules.images import decode_image
from golden import golden_dir


GOLDEN = golden_dir("insightface")
needs_golden = pytest.mark.skipif(GOLDEN is None, reason="golden insightface files not found: set LIT_TASKS_SHARED "
                                  "to the shared folder holding golden/insightface")
VALUES = json.loads((GOLDEN / "values.json").read_text()) if GOLDEN is not None else {}


def jpeg(seed: int, size: int = 12) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="JPEG", quality=90)
    return out.getvalue()


def dump(path: Path, obj, protocol: int = 4) -> Path:
    path.write_bytes(pickle.dumps(obj, protocol=protocol))
    return path


@needs_golden
@pytest.mark.parametrize("name", ["lfw.bin", "lfw_py3.bin"])
def test_golden_bins_give_every_image_and_flag(name):
    lfw = VALUES["lfw"]
    images, issame = load_bin(GOLDEN / name)
    assert issame.dtype == bool and issame.tolist() == lfw["issame"]
    assert len(images) == 2 * lfw["num_pairs"] == 24
    for n, (data, expected) in enumerate(zip(images, lfw["images"])):
        assert isinstance(data, bytes) and len(data) == expected["jpeg_len"], n
        assert hashlib.sha256(data).hexdigest() == expected["jpeg_sha256"], n
    ds = VerificationBinDataset(GOLDEN / name, decode=decode_image)
    assert len(ds) == 12 and ds.name == Path(name).stem
    for i in range(len(ds)):
        pair = ds[i]
        assert pair["index"] == i and pair["same"] is lfw["issame"][i]
        for image, n in ((pair["image_a"], 2 * i), (pair["image_b"], 2 * i + 1)):
            assert image.shape == (112, 112, 3) and image.dtype == np.uint8
            assert hashlib.sha256(image.tobytes()).hexdigest() == lfw["images"][n]["rgb_sha256"], n
            assert image[0, 0].tolist() == lfw["images"][n]["rgb_pixel_0_0"]
    with pytest.raises(IndexError):
        ds[12]


@needs_golden
def test_golden_bins_equal_what_insightface_load_bin_unpickles():
    """``load_bin`` tries plain pickle.load, then encoding='bytes' (the Python 2 file needs the second)."""
    with open(GOLDEN / "lfw.bin", "rb") as f:
        with pytest.raises(UnicodeDecodeError):
            pickle.load(f)
    with open(GOLDEN / "lfw.bin", "rb") as f:
        reference_py2 = pickle.load(f, encoding="bytes")
    with open(GOLDEN / "lfw_py3.bin", "rb") as f:
        reference_py3 = pickle.load(f)
    for name, (bins, flags) in (("lfw.bin", reference_py2), ("lfw_py3.bin", reference_py3)):
        images, issame = load_bin(GOLDEN / name)
        assert images == list(bins) and issame.tolist() == list(flags)


def test_other_legitimate_encodings_load(tmp_path):
    """Python 3 at protocol 2 (bytes via _codecs.encode), bytearrays, cv2.imencode's uint8 arrays, numpy bool flags."""
    encoded = [jpeg(n) for n in range(4)]
    flags = [True, False]
    variants = {
        "proto2.bin": ((encoded, flags), 2),
        "bytearray2.bin": (([bytearray(b) for b in encoded], flags), 2),
        "bytearray4.bin": (([bytearray(b) for b in encoded], flags), 4),
        "numpy2.bin": (([np.frombuffer(b, np.uint8) for b in encoded], [np.bool_(f) for f in flags]), 2),
        "numpy4.bin": (([np.frombuffer(b, np.uint8).reshape(-1, 1) for b in encoded], np.array(flags)), 4),
        "ints.bin": ((encoded, [1, 0]), 4),
    }
    for name, (obj, protocol) in variants.items():
        images, issame = load_bin(dump(tmp_path / name, obj, protocol))
        assert images == encoded and issame.tolist() == flags, name
    ds = VerificationBinDataset(tmp_path / "numpy2.bin", transform=lambda im: im.mean(), decode=decode_image)
    assert ds[1]["image_a"] == pytest.approx(decode_image(encoded[2]).mean()) and ds[1]["same"] is False


def test_without_a_decoder_the_format_gives_the_encoded_bytes(tmp_path):
    """The format decodes nothing itself (the face family passes the decoder): no decoder, the stored bytes."""
    encoded = [jpeg(n) for n in range(4)]
    ds = VerificationBinDataset(dump(tmp_path / "raw.bin", (encoded, [True, False]), 2))
    assert ds[1]["image_a"] == encoded[2] and ds[1]["image_b"] == encoded[3] and ds.image(0) == encoded[0]
    assert VerificationBinDataset(tmp_path / "raw.bin", transform=len)[0]["image_a"] == len(encoded[0])


class _RunsAShellCommand:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {shlex.quote(str(self.marker))}",))


class _CallsEval:
    def __reduce__(self):
        return (eval, ("__import__('os').getpid()",))


def test_a_bin_holding_code_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "executed"
    evil = dump(tmp_path / "evil.bin", ([_RunsAShellCommand(marker), b"x"], [True]), protocol=2)
    with pytest.raises(RefusedPickleError, match=r"evil.bin: refusing to load (posix|os|nt)\.system"):
        load_bin(evil)
    assert not marker.exists()
    # The same file through plain pickle would have run the command: the refusal is what protects.
    with open(evil, "rb") as f:
        pickle.load(f)
    assert marker.exists()
    marker.unlink()
    with pytest.raises(RefusedPickleError, match=r"eval.bin: refusing to load builtins\.eval"):
        load_bin(dump(tmp_path / "eval.bin", ([_CallsEval(), b"x"], [True]), protocol=4))
    with pytest.raises(RefusedPickleError, match=r"objects.bin: refusing numpy dtype object"):
        load_bin(dump(tmp_path / "objects.bin", ([np.array([b"a"], dtype=object), b"x"], [True]), protocol=2))
    # _codecs.encode is allowed for latin1 only (a hand-written pickle asking for another codec).
    other_codec = b"\x80\x02c_codecs\nencode\nX\x03\x00\x00\x00abcX\x06\x00\x00\x00utf-16\x86R."
    (tmp_path / "codec.bin").write_bytes(other_codec)
    with pytest.raises(RefusedPickleError, match=r"codec.bin: refusing _codecs.encode with codec 'utf-16'"):
        load_bin(tmp_path / "codec.bin")
    assert SafeBinUnpickler(io.BytesIO(pickle.dumps(([b"a", b"b"], [True]))), "x").load() == ([b"a", b"b"], [True])


def test_malformed_bins_are_named(tmp_path):
    encoded = [jpeg(n) for n in range(3)]
    with pytest.raises(ValueError, match=r"odd.bin: 3 images for 1 pairs; a verification .bin holds two images per pair"):
        load_bin(dump(tmp_path / "odd.bin", (encoded, [True])))
    with pytest.raises(ValueError, match=r"dict.bin: expected the pair \(images, issame_list\), got dict"):
        load_bin(dump(tmp_path / "dict.bin", {"a": 1}))
    with pytest.raises(ValueError, match=r"ints.bin: image 1: expected encoded image bytes, got int"):
        load_bin(dump(tmp_path / "ints.bin", ([b"a", 7], [True])))
    with pytest.raises(ValueError, match=r"flags.bin: pair 0: expected a bool same/different flag, got 2"):
        load_bin(dump(tmp_path / "flags.bin", ([b"a", b"b"], [2])))
    (tmp_path / "text.bin").write_bytes(b"not a pickle at all")
    with pytest.raises(pickle.UnpicklingError, match=r"text.bin: not a readable pickle"):
        load_bin(tmp_path / "text.bin")
    whole = pickle.dumps((encoded[:2], [True]), protocol=2)
    (tmp_path / "cut.bin").write_bytes(whole[: len(whole) // 2])
    with pytest.raises(pickle.UnpicklingError, match=r"cut.bin: not a readable pickle"):
        load_bin(tmp_path / "cut.bin")
    ds = VerificationBinDataset(dump(tmp_path / "broken.bin", ([encoded[0], encoded[1][:40]], [False])), decode=decode_image)
    with pytest.raises(OSError, match=r"cannot read image .*broken.bin: image 1: "):
        ds[0]
