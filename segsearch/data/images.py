"""Image and mask decoding: files and bytes to uint8 arrays, one rule for ingest and training.

Images become (H, W, C) uint8 with C = 1 (grayscale) or 3 (colour): alpha is dropped, palette
and CMYK images become RGB, 16-bit grayscale is scaled to 8 bits (65535 → 255). Masks become
(H, W) uint8 class ids, or (H, W, 3) colours for ingest to map.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from segsearch.errors import UserError, first_line

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff")
_GRAY = ("L", "LA", "La")
_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N", "I")
#: Stored as the file's own bytes: formats training decodes, in a mode it decodes unchanged.
_KEEP_AS_IS = {("PNG", "L"), ("PNG", "RGB"), ("JPEG", "L"), ("JPEG", "RGB")}


def decode_image(data: bytes) -> np.ndarray:
    """PNG/JPEG/TIFF bytes → (H, W, C) uint8, C = 1 or 3."""
    with Image.open(io.BytesIO(data)) as image:
        return _image_array(image, "image bytes")


def decode_image_at(
    data: bytes, size: tuple[int, int] | None
) -> tuple[np.ndarray, tuple[int, int]]:
    """(the image as `decode_image` gives it, resized to `size` (H, W) when given, bilinear and
    antialiased when shrinking; the image's own (H, W)).

    L and RGB pictures (all a dataset stores: ingest keeps PNG and JPEG in those modes and
    re-encodes the rest) are resized before the array is made, one copy less; a JPEG shrunk to
    half or less is decoded at 1/2, 1/4 or 1/8 scale by libjpeg itself (PIL's `draft`), which
    skips most of the decoding for sharpness the resize would drop anyway. Other modes come back
    at their own size."""
    with Image.open(io.BytesIO(data)) as image:
        own = (image.height, image.width)
        wanted = None if size is None else (size[1], size[0])
        if wanted is None or image.mode not in ("L", "RGB") or image.size == wanted:
            return _image_array(image, "image bytes"), own
        if image.format == "JPEG":
            image.draft(image.mode, wanted)
        resized = image.resize(wanted, Image.BILINEAR) if image.size != wanted else image
        return _image_array(resized, "image bytes"), own


def decode_mask(data: bytes) -> np.ndarray:
    """PNG bytes of class ids (as written by ingest) → (H, W) uint8."""
    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image, dtype=np.uint8)


def encode_png(array: np.ndarray) -> bytes:
    """(H, W), (H, W, 1) or (H, W, 3) uint8 → lossless PNG bytes."""
    if array.dtype != np.uint8 or array.ndim not in (2, 3):
        raise ValueError(f"encode_png needs uint8 (H, W[, C]), got {array.dtype} {array.shape}")
    if array.ndim == 3:
        if array.shape[2] not in (1, 3):
            raise ValueError(f"encode_png needs 1 or 3 channels, got {array.shape[2]}")
        if array.shape[2] == 1:
            array = array[:, :, 0]
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(array)).save(buffer, format="PNG")
    return buffer.getvalue()


def read_image_file(path: str | Path) -> np.ndarray:
    """An image file (PNG/JPEG/TIFF; gray or colour) → (H, W, C) uint8."""
    return read_image_for_storage(path)[0]


def read_image_for_storage(path: str | Path) -> tuple[np.ndarray, bytes | None]:
    """The image's array and, when decoding them gives that array, the file's own bytes.

    PNG and JPEG in L/RGB mode are stored as they are (no re-encoding, no JPEG generation
    loss); anything else is stored as a PNG of the array.
    """
    data = _read_bytes(path)
    with _open(data, path) as image:
        array = _image_array(image, str(path))
        keep = (image.format, image.mode) in _KEEP_AS_IS
    return array, data if keep else None


def read_mask_file(path: str | Path, *, colors: bool = False) -> np.ndarray:
    """A mask file → (H, W) uint8 values (class ids or grey levels) or (H, W, 3) colours.

    A palette mask gives its palette indices (class ids, as in Pascal VOC), or its colours when
    `colors` is set. A 1-bit mask gives 0 and 1.
    """
    data = _read_bytes(path)
    with _open(data, path) as image:
        _single_frame(image, path)
        mode = image.mode
        if mode == "1":
            return np.asarray(image, dtype=np.uint8)
        if mode == "L" or (mode == "P" and not colors):
            return np.asarray(image)
        if mode in _GRAY:
            return np.asarray(image.convert("L"))
        if mode in _SIXTEEN_BIT:
            values = np.asarray(image)
            if values.max(initial=0) > 255 or values.min(initial=0) < 0:
                raise UserError(f"{path}: 16-bit mask has values outside 0..255; save class ids")
            return values.astype(np.uint8)
        if mode in ("RGB", "RGBA", "P", "PA"):
            return np.asarray(image.convert("RGB"))
    raise UserError(f"{path}: unsupported mask mode {mode!r}; save masks as 8-bit gray or RGB PNG")


def image_header(path: str | Path) -> tuple[int, int, int]:
    """(height, width, channels) from the file header alone: checks before decoding pixels."""
    try:
        with Image.open(path) as image:
            height, width, mode = image.height, image.width, image.mode
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as err:
        raise UserError(f"{path}: unreadable image ({first_line(err)})") from None
    return height, width, 1 if mode in ("1", "L", *_GRAY, *_SIXTEEN_BIT) else 3


def _read_bytes(path: str | Path) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as err:
        raise UserError(f"{path}: cannot read ({err.strerror or err})") from None


def _open(data: bytes, path: str | Path) -> Image.Image:
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as err:
        raise UserError(f"{path}: unreadable image ({first_line(err)})") from None
    return image


def _image_array(image: Image.Image, source: str) -> np.ndarray:
    _single_frame(image, source)
    mode = image.mode
    if mode in ("L", "RGB"):
        array = np.asarray(image)
    elif mode in ("1", *_GRAY):
        array = np.asarray(image.convert("L"))
    elif mode in _SIXTEEN_BIT:
        values = np.asarray(image).astype(np.int64)
        if values.min(initial=0) < 0 or values.max(initial=0) > 65535:
            raise UserError(f"{source}: 32-bit integer image; save it as 8 or 16-bit")
        array = ((values * 255 + 32767) // 65535).astype(np.uint8)
    elif mode in ("RGBA", "P", "PA", "CMYK", "YCbCr", "LAB", "HSV", "RGBX", "RGBa"):
        array = np.asarray(image.convert("RGB"))
    else:
        raise UserError(f"{source}: unsupported image mode {mode!r}; save it as 8-bit gray or RGB")
    return array[:, :, None] if array.ndim == 2 else array


def _single_frame(image: Image.Image, source: str | Path) -> None:
    if getattr(image, "n_frames", 1) > 1:
        raise UserError(f"{source}: has {image.n_frames} frames; save one image per file")
