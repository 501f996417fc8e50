"""The images of a user's ImageFolder (``DATA_DIR/{train,val}/<class>/<image>``): listed without following a folder
symlink twice (a loop would list the same files again and again), and checked before training so that a bad file
stops the run in one line naming it, before any epoch is spent.

Every file is opened and its header verified (not an image, empty, a symlink loop, more pixels than PIL's
``Image.MAX_IMAGE_PIXELS``: a decompression bomb); the validation images are also decoded in full, which finds
truncated files (a truncated training image that the header check passes stops the run when it is read, in one line
naming it).
"""

from __future__ import annotations

import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from PIL import Image
from torchvision import datasets
from torchvision.datasets.folder import IMG_EXTENSIONS

from .errors import DataError

SCAN_THREADS = 8


def _walk(folder: Path) -> list[Path]:
    """Every file below ``folder`` in sorted order, each real folder visited once (folder symlinks followed, loops
    not)."""
    seen: set[str] = set()
    files = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:
            dirnames[:] = []
            continue
        seen.add(real)
        dirnames.sort()
        files += [Path(dirpath) / name for name in sorted(filenames)]
    return files


class ImageFolder(datasets.ImageFolder):
    """torchvision's ImageFolder over `_walk`'s listing (no symlink loops); the same classes and samples otherwise."""

    def make_dataset(self, directory, class_to_idx, extensions=None, is_valid_file=None, allow_empty=False):
        samples = []
        for name, index in sorted(class_to_idx.items(), key=lambda item: item[1]):
            samples += [(str(p), index) for p in _walk(Path(directory) / name)
                        if p.name.lower().endswith(IMG_EXTENSIONS)]
        if not samples and not allow_empty:
            raise FileNotFoundError(f"no images ({', '.join(IMG_EXTENSIONS)}) in the class folders of {directory}")
        return samples


def _problem(path: str, decode: bool) -> str | None:
    """What is wrong with image ``path`` (None: nothing found)."""
    try:
        if os.stat(path).st_size == 0:
            return "an empty file"
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                img.verify()
            if decode:
                with Image.open(path) as img:
                    img.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        return f"an image too large to decode ({exc})"
    except OSError as exc:  # unreadable, a symlink loop (ELOOP), not an image, truncated
        return f"not a readable image ({type(exc).__name__}: {' '.join(str(exc).split())[:120]})"
    except (SyntaxError, ValueError) as exc:  # PIL's verify reports broken files so
        return f"a damaged image ({exc})"
    return None


def check_images(folder: datasets.ImageFolder, decode: bool) -> None:
    """Every image of ``folder`` opens (and with ``decode`` decodes in full); the first bad one (in listing order) is
    a ``DataError`` naming the file and what is wrong."""
    paths = [path for path, _ in folder.samples]
    with ThreadPoolExecutor(SCAN_THREADS) as pool:
        problems = list(pool.map(lambda p: _problem(p, decode), paths))
    for path, problem in zip(paths, problems, strict=True):
        if problem is not None:
            raise DataError(f"--data-dir: image {path} is {problem}; remove or replace it (all images are checked "
                            "before training)")


def load_image(path: str, mode: str) -> Image.Image:
    """Image ``path`` in PIL ``mode``; a file that cannot be decoded is a ``DataError`` naming it."""
    try:
        with Image.open(path) as img:
            return img.convert(mode)
    except OSError as exc:
        raise DataError(f"--data-dir: image {path} cannot be decoded ({exc}); remove or replace it") from None
