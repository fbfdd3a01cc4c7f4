"""Image loading that never lies about its input: every mode to RGB, EXIF orientation applied,
decompression bombs refused, and unreadable files reported with a reason instead of skipped.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

# Larger than any real photo in the study's sources (Caltech's largest is ~3.5k px wide), far
# smaller than a crafted bomb. PIL warns at this size and raises at twice it; we raise at it.
MAX_PIXELS = 64_000_000


class ImageLoadError(ValueError):
    """A file that cannot become an RGB image; ``reason`` is a short machine-readable tag."""

    def __init__(self, path: str | Path, reason: str, detail: str = ""):
        self.path, self.reason, self.detail = str(path), reason, detail
        super().__init__(f"{path}: {reason}" + (f" ({detail})" if detail else ""))


@dataclass(frozen=True)
class ImageInfo:
    width: int
    height: int
    mode: str  # the file's own mode, before conversion to RGB


def _open(path: Path) -> Image.Image:
    if not path.is_file():
        raise ImageLoadError(path, "missing")
    if path.stat().st_size == 0:
        raise ImageLoadError(path, "empty")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(path)
            if img.width * img.height > MAX_PIXELS:
                raise ImageLoadError(path, "too_large", f"{img.width}x{img.height} > {MAX_PIXELS} pixels")
            img.load()
    except ImageLoadError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageLoadError(path, "too_large", str(exc)) from exc
    except Image.UnidentifiedImageError as exc:
        raise ImageLoadError(path, "not_an_image", str(exc)) from exc
    except (OSError, SyntaxError, ValueError) as exc:  # truncated / corrupt data
        raise ImageLoadError(path, "corrupt", str(exc)) from exc
    return img


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode to 8-bit RGB; transparency is composited on white, 16-bit is scaled, not clipped."""
    img = ImageOps.exif_transpose(img)
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        arr = np.asarray(img, dtype=np.float64)
        hi = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
        img = Image.fromarray(np.clip(arr / hi * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    elif img.mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        img = Image.fromarray(np.clip(arr / max(arr.max(), 1.0) * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA"):
        background = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, img.convert("RGBA"))
    return img.convert("RGB")


def load_rgb(path: str | Path) -> Image.Image:
    """The RGB image a model sees; raises ImageLoadError (with ``reason``) for anything unusable."""
    path = Path(path)
    img = _open(path)
    try:
        return to_rgb(img)
    except (OSError, ValueError) as exc:
        raise ImageLoadError(path, "corrupt", str(exc)) from exc


def probe(path: str | Path) -> tuple[Image.Image, ImageInfo]:
    """Load as RGB and report the file's own size and mode (after EXIF rotation)."""
    path = Path(path)
    img = _open(path)
    mode = img.mode
    try:
        rgb = to_rgb(img)
    except (OSError, ValueError) as exc:
        raise ImageLoadError(path, "corrupt", str(exc)) from exc
    return rgb, ImageInfo(width=rgb.width, height=rgb.height, mode=mode)
