"""One image file as float32 CHW in [0, 1], for the readers of image data (needs Pillow)."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from fqexport.errors import DataError

PILLOW_MISSING = (
    "reading a CSV image manifest needs Pillow, which is not installed; "
    'install it with: pip install "fqexport[images]"'
)
log = logging.getLogger(__name__)
MSG_ALPHA_DROPPED = ("%s: image %s has an alpha channel (mode %s); fqexport reads its colour "
                     "channels and drops the alpha (warned once per data source)")
_alpha_warned: set[str] = set()
# Largest image (width x height) a CSV manifest may name; Pillow's own bomb limit is 89.5M.
MAX_IMAGE_PIXELS = 50_000_000
MSG_IMAGE_TOO_LARGE = (
    "{where}: image {path} is {w}x{h} = {pixels:,} pixels, more than the limit of {limit:,} "
    "(a decompression bomb or a wrong file); resize it"
)


def read_image(image_path: Path, where: str) -> np.ndarray:
    """One image as float32 CHW in [0, 1]: grayscale (or a grey palette) → 1 channel, colour (or a
    colour palette) → 3 (alpha dropped, with a warning once per source)."""
    try:
        from PIL import Image, UnidentifiedImageError
    except ImportError as err:
        raise DataError(PILLOW_MISSING) from err
    if not image_path.is_file():
        raise DataError(f"{where}: image file not found: {image_path}")
    try:
        with Image.open(image_path) as img:
            w, h = img.size
            if w * h > MAX_IMAGE_PIXELS:
                raise DataError(MSG_IMAGE_TOO_LARGE.format(where=where, path=image_path, w=w, h=h,
                                                           pixels=w * h, limit=MAX_IMAGE_PIXELS))
            img.load()
            bands = img.getbands()
            mode = img.mode
            if mode == "F":
                raise DataError(
                    f"{where}: image {image_path} has 32-bit float mode 'F' with no known "
                    "range; save it as 8- or 16-bit"
                )
            source = where.split(" line ")[0]  # a manifest's "file line N": once per file
            if "A" in bands and source not in _alpha_warned:  # RGBA, LA, PA: not a model input channel
                _alpha_warned.add(source)
                log.warning(MSG_ALPHA_DROPPED, where, image_path, mode)
            if mode in ("P", "PA"):  # a palette: its colours (3 channels), 1 when every entry is grey
                entries = np.asarray(img.getpalette() or [], dtype=np.uint8).reshape(-1, 3)
                gray = bool((entries == entries[:, :1]).all())
                img = img.convert("L" if gray else "RGB")
                bands, mode = img.getbands(), img.mode
            if len(bands) == 1 and mode.startswith("I"):
                raw = np.asarray(img)
                # "I;16*": 16-bit grayscale; "I" (32-bit integers): older Pillows' 16-bit PNGs, read
                # alike, but values outside 0..65535 have no known range (they came out up to ~15)
                if mode == "I" and raw.size and (int(raw.min()) < 0 or int(raw.max()) > 65535):
                    raise DataError(
                        f"{where}: image {image_path} has 32-bit integer mode 'I' with values "
                        f"{int(raw.min())}..{int(raw.max())}, outside the 16-bit range fqexport scales to [0, 1]; "
                        "save it as 8- or 16-bit"
                    )
                arr = raw.astype(np.float32) / 65535.0
            elif len(bands) == 1 or mode == "LA":
                arr = np.asarray(img.convert("L"), dtype=np.float32) / 255.0
            else:
                arr = np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0
    except DataError:
        raise
    except Image.DecompressionBombError as err:
        raise DataError(f"{where}: image {image_path} is a decompression bomb ({err}); resize it") from err
    except (OSError, UnidentifiedImageError, ValueError, MemoryError) as err:
        raise DataError(f"{where}: cannot read image {image_path}: {err}") from err
    if arr.ndim == 2:
        return arr[None]
    return np.ascontiguousarray(arr.transpose(2, 0, 1))
