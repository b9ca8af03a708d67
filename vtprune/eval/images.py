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
    data = _image_bytes(value, where)
    try:
        image = Image.open(io.BytesIO(data))
    except (UnidentifiedImageError, OSError):
        field = value.field if isinstance(value, _ImageFile) else "image"
        raise where.error(field, "is not a readable image", "replace the image with a valid JPEG/PNG") from None
    # RGB images stay undecoded until the processor reads them, so a whole benchmark's pixels are not held
    # at once; other modes are converted now (lmms-eval's doc_to_visual calls .convert("RGB")).
    return image if image.mode == "RGB" else image.convert("RGB")


def _image_bytes(value, where: _Where) -> bytes:
    if isinstance(value, dict):  # an HF Image feature: {"bytes": ..., "path": ...}
        if value.get("bytes"):
            return value["bytes"]
        if value.get("path"):
            value = _ImageFile(Path(value["path"]), "image", "the path stored in the dataset")
    if isinstance(value, (bytes, bytearray)) and value:
        return bytes(value)
    if isinstance(value, _ImageFile):
        if not value.path.is_file():
            raise where.error(value.field, f"names image {value.path}, which does not exist",
                              f"put the images in {value.hint}")
        return value.path.read_bytes()
    raise where.error("image", "is missing or empty", "every row needs its image (an HF Image struct with bytes)")
