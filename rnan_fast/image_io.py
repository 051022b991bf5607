"""Image files in and out: the one home of the package's image I/O.

Two readers, for two jobs:

- ``read_image``: the benchmark reader of eval and training: uint8 (H, W) or (H, W, 3), the
  pixels as stored (no orientation, no profile), 16-bit gray mapped by /257 and rounded.
- ``read_photo``: a user's photo with everything it carries, for ``restore``: the EXIF
  orientation applied, the ICC profile and the EXIF block kept (orientation reset to 1), alpha
  split off, 16 bits per channel kept (the model sees value / 257 unrounded), gray kept gray.
  ``write_photo`` writes such a photo back in a chosen format.

Which decoder reads what, and why:

- Pillow: every 8-bit image and 16-bit gray, and all metadata. Pillow decodes 16-bit-per-channel
  colour PNGs and TIFFs to 8 bits by truncation (1000 -> 3), so those go elsewhere:
- OpenCV (``cv2.imdecode`` with IMREAD_UNCHANGED, which ignores EXIF orientation: we apply it
  once, ourselves): 16-bit colour and gray-with-alpha PNGs.
- tifffile: 16-bit colour TIFFs (OpenCV refuses TIFFs with an orientation tag; tifffile gives the
  stored pixels and we orient them). Pillow itself applies a TIFF's orientation while decoding,
  so for 8-bit TIFFs the orientation is taken as applied.

Writers: Pillow for 8-bit files and 16-bit gray PNG/TIFF; 16-bit colour PNGs are encoded here
(IHDR, the Sub filter, zlib; iCCP and eXIf chunks carry the profile and EXIF), 16-bit colour
TIFFs by tifffile (ICC profile and the EXIF block's first-directory text tags; EXIF
sub-directories such as GPS have no writer there and are dropped, said once).
"""
from __future__ import annotations

import contextlib
import io
import os
import struct
import tempfile
import threading
import warnings
import zlib
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
from PIL import Image, ImageCms, TiffImagePlugin, UnidentifiedImageError

from rnan_fast.imresize import imresize, round_half_away, to_uint8

__all__ = [
    "IMAGE_EXTENSIONS", "ImageReadError", "read_image", "atomic_write", "new_file_mode", "write_png_atomic",
    "list_images", "Photo", "read_photo", "write_photo", "OUTPUT_FORMATS", "output_suffix", "DEFAULT_MAX_PIXELS",
    "DEFAULT_QUALITY", "resize_alpha", "with_pixels",
]

IMAGE_EXTENSIONS = (".png", ".bmp", ".jpg", ".jpeg", ".tif", ".tiff", ".ppm", ".pgm", ".webp", ".gif")

# Pillow's own decompression-bomb limit (89,478,485 pixels, ~9,459 x 9,459); read_photo applies
# its own check with this default so that a user can raise it (--max-pixels).
DEFAULT_MAX_PIXELS = Image.MAX_IMAGE_PIXELS
DEFAULT_QUALITY = 95    # JPEG / WebP: a restored photo should not lose what restoring gained

# --ext choices -> (Pillow format, the suffix written)
OUTPUT_FORMATS = {"png": ("PNG", ".png"), "jpg": ("JPEG", ".jpg"), "webp": ("WEBP", ".webp"),
                  "tiff": ("TIFF", ".tiff")}
_SUFFIX_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP", ".tif": "TIFF",
                   ".tiff": "TIFF"}
_MODES_16BIT = ("I;16", "I;16L", "I;16B", "I;16N")
_ORIENTATION = 0x0112
# First-directory tags of a TIFF that describe its pixels, not the photo: they never travel into
# another file's EXIF (width, bits, compression, strips, resolution, ICC (kept apart), ...).
_TIFF_LAYOUT_TAGS = frozenset({254, 255, 256, 257, 258, 259, 262, 263, 266, 273, 277, 278, 279, 280, 281,
                               282, 283, 284, 290, 291, 296, 317, 320, 322, 323, 324, 325, 338, 339, 340,
                               341, 347, 530, 531, 532, 34675})
_SUB_IFDS = (0x8769, 0x8825)   # the Exif and GPS sub-directories of an EXIF block
_PIL_LIMIT_LOCK = threading.Lock()


class ImageReadError(ValueError):
    """An input file that is not a readable image."""


# --------------------------------------------------------------------------- benchmark reader

def read_image(path: str | os.PathLike) -> np.ndarray:
    """Read an image as uint8: (H, W) for gray files, (H, W, 3) for colour ones.

    The scale comes from the file's Pillow mode, never from its content:

    - "L", "RGB": as stored; "1", "LA": gray ("1" gives 0 and 255); palette, alpha and other
      colour modes: Pillow's convert("RGB") (alpha dropped).
    - 16-bit gray ("I;16", "I;16L", "I;16B", "I;16N"): 0..65535 mapped to 0..255 by /257,
      rounded half away from zero, so a dark 16-bit image stays dark.
    - 32-bit integer ("I") and float ("F") images are refused: such files carry no agreed
      value range (0..255? 0..65535? 0..1?), and guessing one would silently change PSNR.
      Convert them to 8- or 16-bit first.

    Raises ImageReadError (a ValueError) naming the file when it cannot be read or decoded,
    when Pillow refuses it as a decompression bomb, or for the refused modes above.
    """
    path = Path(path)
    try:
        with Image.open(path) as im:
            mode = im.mode
            _refuse_ambiguous_mode(path, mode)
            im.load()
            if mode in _MODES_16BIT:
                arr = to_uint8(np.asarray(im, dtype=np.float64) / 257.0)
            elif mode in ("L", "RGB"):
                arr = np.array(im, dtype=np.uint8)
            elif mode in ("1", "LA"):
                arr = np.array(im.convert("L"), dtype=np.uint8)
            else:
                arr = np.array(im.convert("RGB"), dtype=np.uint8)
    except ImageReadError:
        raise
    except Exception as e:  # noqa: BLE001 - every decoder failure becomes one line naming the file
        raise _read_error(path, e) from None
    return arr


def _refuse_ambiguous_mode(path: Path, mode: str) -> None:
    if mode in ("I", "F") or (mode.startswith("I;") and mode not in _MODES_16BIT):
        kind = "32-bit integer" if mode == "I" else ("floating-point" if mode == "F" else "signed")
        raise ImageReadError(f"{path}: {kind} images (Pillow mode {mode}) are not supported, their "
                             f"value range is ambiguous; convert the file to 8- or 16-bit")


def _read_error(path: Path, e: BaseException) -> ImageReadError:
    if isinstance(e, FileNotFoundError):
        return ImageReadError(f"{path}: no such file")
    if isinstance(e, IsADirectoryError):
        return ImageReadError(f"{path}: is a directory")
    if isinstance(e, PermissionError):
        return ImageReadError(f"{path}: permission denied")
    if isinstance(e, Image.DecompressionBombError):
        return ImageReadError(f"{path}: refused as a possible decompression bomb ({e})")
    if isinstance(e, UnidentifiedImageError):
        return ImageReadError(f"{path}: not a readable image (unknown or damaged image format)")
    if isinstance(e, (OSError, SyntaxError, ValueError, EOFError, struct.error,
                      IndexError, KeyError, TypeError, RuntimeError)):
        return ImageReadError(f"{path}: not a readable image ({_one_line(e)})")
    raise e


def _one_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


# --------------------------------------------------------------------------- photos

@dataclass(frozen=True)
class Photo:
    """A decoded photo, ready for a model, with what must go back into its output.

    pixels: float32 (H, W) gray or (H, W, 3) RGB on the 0..255 scale, displayed orientation;
        16-bit files give value / 257 (unrounded: finer than one 8-bit step).
    alpha: float32 (H, W) on the same 0..255 scale, or None.
    bit_depth: 8 or 16 (per channel, as stored).
    format: Pillow's name of the file's format ("JPEG", "PNG", "WEBP", "TIFF", "GIF", ...).
    icc_profile: the embedded ICC profile's bytes, or None (CMYK converted to sRGB: None).
    exif: the EXIF block (PIL.Image.Exif) with the orientation reset to 1, or None.
    orientation: the EXIF orientation (1..8) that was applied.
    notes: what reading had to change, one short sentence each (first frame of an animation,
        CMYK conversion, ...).
    """

    pixels: np.ndarray
    alpha: np.ndarray | None = None
    bit_depth: int = 8
    format: str | None = None
    icc_profile: bytes | None = None
    exif: Image.Exif | None = None
    orientation: int = 1
    notes: tuple[str, ...] = field(default=())

    @property
    def gray(self) -> bool:
        return self.pixels.ndim == 2


@contextlib.contextmanager
def _pillow_limit_off():
    """Pillow's own bomb check off while we open (read_photo applies max_pixels itself, so that
    it can be raised); a lock keeps the global setting consistent across threads."""
    with _PIL_LIMIT_LOCK:
        saved = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = None
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                yield
        finally:
            Image.MAX_IMAGE_PIXELS = saved


def read_photo(path: str | os.PathLike, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> Photo:
    """Read a user's image file as a Photo (see the class). max_pixels: refuse images with more
    pixels (a guard against decompression bombs; None: no limit). Raises ImageReadError naming
    the file and what is wrong: missing, empty, truncated or corrupt, too large, zero-size, or
    of a mode with no agreed value range (32-bit integer, float)."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise _read_error(path, e) from None
    if not data:
        raise ImageReadError(f"{path}: empty file (0 bytes)")
    try:
        with _pillow_limit_off():
            im = Image.open(io.BytesIO(data))
        with im:
            w, h = im.size
            if w == 0 or h == 0:
                raise ImageReadError(f"{path}: the image has no pixels ({w}x{h})")
            if max_pixels is not None and w * h > max_pixels:
                raise ImageReadError(f"{path}: {w}x{h} = {w * h:,} pixels is over the limit of {max_pixels:,} "
                                     f"(a guard against decompression bombs); if you trust the file, pass "
                                     f"--max-pixels {w * h} (Python: max_pixels=)")
            return _decode(path, data, im)
    except ImageReadError:
        raise
    except Exception as e:  # noqa: BLE001 - any decoder failure: one line naming the file
        raise _read_error(path, e) from None


def _decode(path: Path, data: bytes, im: Image.Image) -> Photo:
    notes = []
    frames = _frame_count(im)
    if frames > 1:
        notes.append(f"{frames} frames or pages: the first is restored")
    mode = im.mode
    _refuse_ambiguous_mode(path, mode)
    fmt = im.format
    # Pillow orients a TIFF while decoding it and then drops the tag: read it before the decode
    stored_orientation = im.tag_v2.get(_ORIENTATION, 1) if fmt == "TIFF" else None
    im.load()
    icc = im.info.get("icc_profile") or None
    exif, orientation = _exif(im, fmt)
    if stored_orientation is not None:
        orientation = stored_orientation if stored_orientation in range(1, 9) else 1
    bits = 8
    alpha = None
    deep = _deep_colour(data, im)
    if deep is not None:                       # 16-bit colour (or gray + alpha): see the module doc
        arr = _decode_deep(path, data, deep)
        bits = 16
        pixels, alpha = _split_alpha(arr.astype(np.float32) / 257.0)
    elif mode in _MODES_16BIT:
        pixels, bits = np.asarray(im, dtype=np.float32) / 257.0, 16
    elif mode in ("1", "L"):
        pixels = np.asarray(im.convert("L"), dtype=np.float32)
    elif mode in ("LA", "La"):
        pixels, alpha = _split_alpha(np.asarray(im.convert("LA"), dtype=np.float32))
    elif mode == "CMYK":
        rgb, note = _cmyk_to_rgb(im, icc)
        notes.append(note)
        icc = None                             # the pixels are sRGB now
        pixels = np.asarray(rgb, dtype=np.float32)
    elif mode in ("RGBA", "RGBa", "PA") or (mode == "P" and "transparency" in im.info):
        pixels, alpha = _split_alpha(np.asarray(im.convert("RGBA"), dtype=np.float32))
    else:                                      # RGB, P, YCbCr, LAB, HSV, RGBX
        pixels = np.asarray(im.convert("RGB"), dtype=np.float32)
    if orientation != 1 and (fmt != "TIFF" or deep is not None):  # Pillow orients the TIFFs it decodes
        pixels = _orient(pixels, orientation)
        alpha = None if alpha is None else _orient(alpha, orientation)
    return Photo(np.ascontiguousarray(pixels), None if alpha is None else np.ascontiguousarray(alpha), bits, fmt,
                 icc, exif, orientation, tuple(notes))


def _frame_count(im: Image.Image) -> int:
    try:
        return int(getattr(im, "n_frames", 1))
    except (OSError, ValueError, EOFError):   # a broken later frame: the first may still decode
        return 1


def _exif(im: Image.Image, fmt: str | None) -> tuple[Image.Exif | None, int]:
    """(the EXIF block with orientation 1, or None; the orientation it gave, 1 when unknown)."""
    exif = im.getexif()
    value = exif.get(_ORIENTATION, 1)
    orientation = value if isinstance(value, int) and 1 <= value <= 8 else 1
    if fmt == "TIFF":   # a TIFF's first directory is its EXIF: keep the photo's tags, not the layout's
        kept = Image.Exif()
        for key, val in exif.items():
            if key not in _TIFF_LAYOUT_TAGS and key not in _SUB_IFDS:
                kept[key] = val
        for ifd in _SUB_IFDS:                  # (their offsets are the source file's: copy the contents)
            sub = exif.get_ifd(ifd)
            if sub:
                kept.get_ifd(ifd).update(sub)
        exif = kept
    if _ORIENTATION in exif:
        exif[_ORIENTATION] = 1
    has_any = len(exif) > 0 or any(exif.get_ifd(i) for i in _SUB_IFDS)
    return (exif if has_any else None), orientation


def _orient(a: np.ndarray, orientation: int) -> np.ndarray:
    """The displayed image of pixels stored with EXIF `orientation` (2..8), as Pillow's
    ImageOps.exif_transpose: 2 mirror, 3 rotate 180, 4 flip, 5 transpose, 6 rotate 90 clockwise,
    7 transverse, 8 rotate 90 counter-clockwise. a: (H, W) or (H, W, C)."""
    if orientation == 2:
        return a[:, ::-1]
    if orientation == 3:
        return a[::-1, ::-1]
    if orientation == 4:
        return a[::-1]
    if orientation == 5:
        return a.swapaxes(0, 1)
    if orientation == 6:
        return np.rot90(a, k=-1)
    if orientation == 7:
        return a[::-1, ::-1].swapaxes(0, 1)
    if orientation == 8:
        return np.rot90(a, k=1)
    return a


def _split_alpha(a: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """(colour, alpha) of an (H, W, 2) gray+alpha or (H, W, 4) RGBA array; others unchanged."""
    if a.ndim == 3 and a.shape[2] in (2, 4):
        colour = a[..., 0] if a.shape[2] == 2 else a[..., :3]
        return colour, a[..., -1]
    return a, None


def _cmyk_to_rgb(im: Image.Image, icc: bytes | None) -> tuple[Image.Image, str]:
    if icc:
        try:
            src = ImageCms.ImageCmsProfile(io.BytesIO(icc))
            srgb = ImageCms.createProfile("sRGB")
            return ImageCms.profileToProfile(im, src, srgb, outputMode="RGB"), \
                "CMYK converted to sRGB through its ICC profile"
        except (ImageCms.PyCMSError, OSError, ValueError):
            pass
    return im.convert("RGB"), "CMYK without a usable ICC profile: converted to RGB without colour management"


def _deep_colour(data: bytes, im: Image.Image) -> str | None:
    """"png" or "tiff" when the file stores 16 bits per channel in colour or with alpha (which
    Pillow would truncate to 8); None otherwise (16-bit gray included: Pillow reads it)."""
    if im.format == "PNG" and data[12:16] == b"IHDR":
        depth, colour_type = data[24], data[25]
        return "png" if depth == 16 and colour_type in (2, 4, 6) else None
    if im.format == "TIFF":
        bits = im.tag_v2.get(258)
        bits = bits if isinstance(bits, tuple) else (bits,)
        samples = im.tag_v2.get(277, 1)
        return "tiff" if 16 in bits and samples >= 2 else None
    return None


def _decode_deep(path: Path, data: bytes, kind: str) -> np.ndarray:
    """uint16 (H, W, C) of a 16-bit colour PNG (OpenCV) or TIFF (tifffile), channels in RGB(A)
    or gray+alpha order, stored orientation."""
    if kind == "png":
        import cv2

        arr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
        if arr is None:
            raise ImageReadError(f"{path}: not a readable image (OpenCV could not decode the 16-bit PNG)")
        if arr.ndim == 3:   # OpenCV's order is BGR(A)
            arr = arr[..., [2, 1, 0, 3]] if arr.shape[2] == 4 else arr[..., ::-1]
        if data[25] == 4 and arr.ndim == 3:    # gray + alpha, expanded by OpenCV
            arr = arr[..., [0, 3]]
    else:
        import tifffile

        with tifffile.TiffFile(io.BytesIO(data)) as tf:
            page = tf.pages[0]
            arr = page.asarray()
            if page.planarconfig == tifffile.PLANARCONFIG.SEPARATE and arr.ndim == 3:
                arr = np.moveaxis(arr, 0, -1)
    if arr.dtype != np.uint16 or arr.ndim != 3 or arr.shape[2] not in (2, 3, 4):
        raise ImageReadError(f"{path}: unsupported 16-bit layout ({arr.dtype}, shape {arr.shape})")
    return arr


# --------------------------------------------------------------------------- writing

def output_suffix(src: str | os.PathLike, ext: str) -> str:
    """The suffix an output of `src` gets under --ext `ext`: "auto" keeps the input's own suffix
    when it names a format we write (PNG, JPEG, WebP, TIFF; as spelled, e.g. ".JPEG"), else
    ".png"; otherwise OUTPUT_FORMATS[ext]'s suffix."""
    if ext == "auto":
        suffix = Path(src).suffix
        return suffix if suffix.lower() in _SUFFIX_FORMATS else ".png"
    if ext not in OUTPUT_FORMATS:
        raise ValueError(f"unknown output format {ext!r}; expected auto or one of {', '.join(OUTPUT_FORMATS)}")
    return OUTPUT_FORMATS[ext][1]


def _quantize(a: np.ndarray, bits: int) -> np.ndarray:
    """0..255 floats -> uint8, or uint16 (x257) for 16 bits; rounded half away from zero, clamped."""
    if bits == 8:
        return to_uint8(a)
    return np.clip(round_half_away(np.asarray(a, dtype=np.float64) * 257.0), 0, 65535).astype(np.uint16)


def write_photo(path: str | os.PathLike, photo: Photo, *, quality: int = DEFAULT_QUALITY) -> list[str]:
    """Write a photo (its pixels: float (H, W) or (H, W, 3) on 0..255, e.g. a restored one from
    with_pixels) with its alpha, ICC profile and EXIF, in the format named by the suffix of `path`
    (.png, .jpg/.jpeg, .webp, .tif/.tiff), atomically (atomic_write). 16-bit photos stay 16-bit
    in PNG and TIFF; JPEG and WebP hold 8 bits and JPEG no alpha: what a format cannot hold is
    dropped and said in the returned notes. quality: JPEG / WebP quality (1..100)."""
    path = Path(path)
    fmt = _SUFFIX_FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise ValueError(f"{path}: cannot tell the output format from the suffix {path.suffix!r}; "
                         f"use one of {', '.join(sorted(_SUFFIX_FORMATS))}")
    pixels = photo.pixels
    alpha, notes = photo.alpha, []
    if alpha is not None and alpha.shape != pixels.shape[:2]:
        raise ValueError(f"alpha of {alpha.shape} does not match pixels of {pixels.shape[:2]}")
    bits = photo.bit_depth
    if bits == 16 and fmt in ("JPEG", "WEBP"):
        bits = 8
        notes.append(f"16-bit input written as 8-bit {fmt} (the format holds 8 bits; --ext png or tiff keeps 16)")
    if alpha is not None and fmt == "JPEG":
        alpha = None
        notes.append("alpha dropped: JPEG has no transparency (--ext png, webp or tiff keeps it)")
    colour = _quantize(pixels, bits)
    a = None if alpha is None else _quantize(alpha, bits)
    arr = colour if a is None else np.dstack([colour, a])
    with atomic_write(path, mode=new_file_mode()) as f:
        if bits == 16 and arr.ndim == 3:
            if fmt == "PNG":
                f.write(_encode_png16(arr, photo.icc_profile, photo.exif))
            else:
                notes.extend(_write_tiff16(f, arr, photo))
        else:
            _save_pillow(f, arr, fmt, photo, quality)
    return notes


def _save_pillow(f, arr: np.ndarray, fmt: str, photo: Photo, quality: int) -> None:
    im = Image.fromarray(arr)   # uint16 (H, W): I;16; uint8 by channels: L, LA, RGB, RGBA
    if fmt == "WEBP" and im.mode in ("L", "LA"):   # WebP stores colour only
        im = im.convert("RGB" if im.mode == "L" else "RGBA")
    kwargs = {}
    if photo.icc_profile:
        kwargs["icc_profile"] = photo.icc_profile
    if fmt in ("JPEG", "WEBP"):
        kwargs["quality"] = int(quality)
    if photo.exif is not None:
        if fmt == "TIFF":
            kwargs["tiffinfo"] = _tiff_directory(photo.exif)
        else:
            kwargs["exif"] = photo.exif
    im.save(f, format=fmt, **kwargs)


def _tiff_directory(exif: Image.Exif) -> TiffImagePlugin.ImageFileDirectory_v2:
    """The EXIF block as a TIFF first directory, with the Exif and GPS sub-directories nested
    (Pillow's TIFF writer drops sub-directories given as `exif=`)."""
    ifd = TiffImagePlugin.ImageFileDirectory_v2()
    for key, value in exif.items():
        if key not in _SUB_IFDS:
            ifd[key] = value
    for key in _SUB_IFDS:
        sub = exif.get_ifd(key)
        if sub:
            ifd[key] = dict(sub)
    return ifd


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)


def _encode_png16(arr: np.ndarray, icc: bytes | None, exif: Image.Exif | None) -> bytes:
    """A 16-bit PNG of uint16 (H, W, C), C = 2 (gray + alpha), 3 (RGB) or 4 (RGBA). Each row
    uses the Sub filter (difference to the same byte of the pixel before), which compresses
    photos far better than none and vectorises in numpy."""
    h, w, c = arr.shape
    colour_type = {2: 4, 3: 2, 4: 6}[c]
    raw = np.ascontiguousarray(arr, dtype=">u2").view(np.uint8).reshape(h, w * c * 2)
    bpp = c * 2
    sub = raw.copy()
    sub[:, bpp:] = raw[:, bpp:] - raw[:, :-bpp]          # uint8 arithmetic wraps: mod 256, as PNG wants
    rows = np.hstack([np.ones((h, 1), np.uint8), sub])    # filter type 1 (Sub) before each row
    out = [b"\x89PNG\r\n\x1a\n", _png_chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, colour_type, 0, 0, 0))]
    if icc:
        out.append(_png_chunk(b"iCCP", b"ICC profile\x00\x00" + zlib.compress(icc)))
    if exif is not None:
        body = exif.tobytes(8)
        out.append(_png_chunk(b"eXIf", body[6:] if body.startswith(b"Exif\x00\x00") else body))
    out.append(_png_chunk(b"IDAT", zlib.compress(rows.tobytes(), 6)))
    out.append(_png_chunk(b"IEND", b""))
    return b"".join(out)


def _write_tiff16(f, arr: np.ndarray, photo: Photo) -> list[str]:
    """A 16-bit TIFF of uint16 (H, W, C) (gray + alpha, RGB, RGBA) through tifffile, with the ICC
    profile and the EXIF block's first-directory text tags."""
    import tifffile

    c = arr.shape[2]
    extratags, notes = [], []
    if photo.icc_profile:
        extratags.append((34675, "B", len(photo.icc_profile), photo.icc_profile, True))
    if photo.exif is not None:
        for key, value in photo.exif.items():
            if isinstance(value, str) and key not in _TIFF_LAYOUT_TAGS and key not in _SUB_IFDS:
                extratags.append((key, "s", 0, value, True))
        if any(photo.exif.get_ifd(i) for i in _SUB_IFDS):
            notes.append("16-bit TIFF: EXIF sub-directories (camera settings, GPS) are not written; "
                         "--ext png keeps them")
    photometric = "minisblack" if c == 2 else "rgb"
    extrasamples = (2,) if c in (2, 4) else None           # 2: unassociated alpha
    buf = io.BytesIO()   # tifffile wants a named file or a buffer, not atomic_write's descriptor
    tifffile.imwrite(buf, arr, photometric=photometric, extrasamples=extrasamples, extratags=extratags,
                     compression="zlib", software=False, metadata=None)
    f.write(buf.getvalue())
    return notes


# --------------------------------------------------------------------------- files

@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, *, mode: int | None = None, durable: bool = False):
    """A binary file to write in a with-block; it becomes `path` when the block ends without error.
    The bytes go to a temporary file in the same folder, then os.replace: a reader never sees a
    half-written file, and on any error (KeyboardInterrupt included) the temporary is removed
    and `path` is left as it was. mode: the permission bits to give the file (mkstemp makes
    0600). durable: fsync the file before the rename and the folder after it, so that the new
    file survives a power cut (a crash, SIGKILL included, already sees the old or the new one)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            if durable:
                f.flush()
                os.fsync(f.fileno())
        if mode is not None:
            os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    if durable:
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)  # the rename itself survives a power cut only once the folder is synced
        finally:
            os.close(dir_fd)


def write_png_atomic(path: str | os.PathLike, img: np.ndarray) -> None:
    """Write a uint8 (H, W) or (H, W, 3) array as PNG through atomic_write, with the permissions
    of an ordinary new file (0666 less the umask): a reader never sees a half-written file and
    no temporary is left."""
    img = np.asarray(img)
    if img.dtype != np.uint8:
        raise TypeError(f"write_png_atomic expects uint8, got {img.dtype}")
    with atomic_write(path, mode=new_file_mode()) as f:
        Image.fromarray(img).save(f, format="PNG")


def new_file_mode() -> int:
    """The permissions of an ordinary new file: 0666 less the umask (mkstemp's own are 0600).
    The umask can only be read by setting it, so it is set and put back at once."""
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


def list_images(folder: str | os.PathLike) -> list[Path]:
    """Image files directly in `folder` (by extension, case-insensitive), sorted by name."""
    folder = Path(folder)
    return sorted((p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS),
                  key=lambda p: p.name)


def resize_alpha(alpha: np.ndarray, scale: int) -> np.ndarray:
    """An alpha plane (H, W) float on 0..255 brought to an SR output's size (scale*H, scale*W)
    with MATLAB's bicubic (the package's resampler), clamped to 0..255."""
    h, w = alpha.shape
    return np.clip(imresize(alpha.astype(np.float64), output_shape=(h * scale, w * scale)), 0, 255).astype(np.float32)


def with_pixels(photo: Photo, pixels: np.ndarray, scale: int = 1) -> Photo:
    """The photo with restored pixels (an SR model's output: `scale` times larger; the alpha
    is resized to match)."""
    alpha = photo.alpha
    if alpha is not None and scale != 1:
        alpha = resize_alpha(alpha, scale)
    return replace(photo, pixels=pixels, alpha=alpha)
