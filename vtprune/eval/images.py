"""Opening a row's image: whatever form a format stores it in (bytes, an HF Image struct, a file next to the
benchmark's own files) becomes a PIL image, or a ValueError naming the row and where the image was expected.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from .fields import _Where


@dataclass(frozen=True)
class _ImageFile:
    path: Path
    field: str  # the row field that named it, for the error message
    hint: str   # where such images are expected to be


def _open_image(value, where: _Where) -> Image.Image:
    if isinstance(value, dict) and not value.get("bytes") and value.get("path"):  # an HF Image struct with a path
        value = _ImageFile(Path(value["path"]), "image", "the path stored in the dataset")
    data = _image_bytes(value, where)
    try:
        image = _decoded(data)
    except _UNREADABLE as error:
        raise _unreadable(value, where, error) from None
    if image.mode != "RGB":  # lmms-eval's doc_to_visual calls .convert("RGB")
        return image.convert("RGB")
    # Reopened undecoded, so that a whole benchmark's pixels are not held at once: the processor decodes it again
    # when it reads it (the check costs a second decode, milliseconds an image, against hours of generation).
    return Image.open(io.BytesIO(data))


# What PIL raises on bytes that are no image, or an image cut short or corrupt (a decompression bomb: the size a
# corrupt header claims, as a rule).
_UNREADABLE = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)


def _decoded(data: bytes) -> Image.Image:
    """The image, decoded whole: Image.open reads only the header, so a truncated or corrupt file would pass it
    and stop the run later, in the processor, naming neither the file nor the row."""
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


def _unreadable(value, where: _Where, error: Exception) -> ValueError:
    reason = "not an image file" if isinstance(error, UnidentifiedImageError) else str(error)
    if isinstance(value, _ImageFile):  # the file actually read, which a path like ../x or /x takes elsewhere
        return where.error(value.field, f"names {value.path.resolve()}, which is not a readable image ({reason})",
                           "replace the image with a valid JPEG/PNG, or correct the path")
    return where.error("image", f"is not a readable image ({reason})", "replace the image with a valid JPEG/PNG")


def _image_bytes(value, where: _Where) -> bytes:
    if isinstance(value, dict) and value.get("bytes"):  # an HF Image feature: {"bytes": ..., "path": ...}
        return value["bytes"]
    if isinstance(value, (bytes, bytearray)) and value:
        return bytes(value)
    if isinstance(value, _ImageFile):
        if not value.path.is_file():
            state = "a folder, not an image file" if value.path.is_dir() else "which does not exist"
            raise where.error(value.field, f"names image {value.path}, {state}", f"put the images in {value.hint}")
        return value.path.read_bytes()
    if isinstance(value, str) and value.strip():  # a base64 string (MMBench's TSV format) or a path, in a table
        raise where.error("image", f"is a string ({value[:20]!r}...), not an image", "expected an HF Image struct "
                          "(bytes and path) as lmms-eval's copies store it: save the images as a datasets Image column")
    raise where.error("image", "is missing or empty", "every row needs its image (an HF Image struct with bytes)")
