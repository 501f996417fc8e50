"""Datasets and loaders of the experiments (SPEC B §6.5 for the reference's three), plus synthetic stand-ins for tests.

MNIST, Fashion-MNIST and CIFAR-10 are read with torchvision from ``DATA_DIR`` (downloaded there when missing; the
IDX files of MNIST and Fashion-MNIST are checked against their MD5s); ImageNet is read from
``DATA_DIR/imagenet_raw/{train,val}/<class>/``, a user's images from ``DATA_DIR/{train,val}/<class>/``.
The "val" split of every experiment is its test/val set, as in the reference. A missing or damaged dataset is a
``DataError`` that says what was looked for and how to provide it.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any, NamedTuple

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler
from torch.utils.data.distributed import DistributedSampler
from torchvision import datasets, transforms

from . import image_files
from .errors import DataError
from .experiments import Experiment
from .mnist_files import ensure_idx

CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
DOWNLOAD_TIMEOUT_S = 60
STATS_IMAGES = 1000  # training images the ImageFolder mean/std is computed on (evenly spaced)
GRAY_MODES = ("1", "L", "LA", "I", "I;16", "F")  # PIL modes read as one channel


@contextmanager
def _socket_timeout(seconds: float) -> Iterator[None]:
    old = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(old)


def mnist(data_dir: Path, fashion: bool = False, fetch: bool = True, channels: int = 1) -> tuple[Dataset, Dataset]:
    """MNIST (or Fashion-MNIST) train/test with ``ToTensor`` only (no normalisation); ``channels`` 3 repeats the
    gray channel; ``fetch``: see `load_data`."""
    cls = datasets.FashionMNIST if fashion else datasets.MNIST
    ensure_idx(data_dir, cls.__name__, fetch)
    tf = transforms.ToTensor() if channels == 1 else transforms.Compose(
        [transforms.Grayscale(num_output_channels=channels), transforms.ToTensor()])
    return cls(str(data_dir), train=True, transform=tf), cls(str(data_dir), train=False, transform=tf)


def _image_mode(folder: datasets.ImageFolder, channels: int | None) -> str:
    """PIL mode the images are read in: from ``channels`` (1 or 3), else from the first training image."""
    if channels is None:
        with Image.open(folder.samples[0][0]) as img:
            channels = 1 if img.mode in GRAY_MODES else 3
    return "L" if channels == 1 else "RGB"


def channel_stats(dataset: Dataset, limit: int = STATS_IMAGES) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of (up to ``limit`` evenly spaced) images of ``dataset``."""
    step = max(1, len(dataset) // limit)
    images = torch.stack([dataset[i][0] for i in range(0, len(dataset), step)][:limit])
    flat = images.transpose(0, 1).reshape(images.shape[1], -1).double()
    return flat.mean(1).tolist(), flat.std(1).clamp_min(1e-6).tolist()


def imagefolder(data_dir: Path, image_size: int, channels: int | None = None,
                norm: tuple[Sequence[float], Sequence[float]] | None = None) -> tuple[Dataset, Dataset, dict[str, Any]]:
    """A user's images from ``DATA_DIR/{train,val}/<class>/``: resized (shorter side) and centre-cropped to
    ``image_size``, training images randomly shifted by up to 1/8 of the side (no flips), normalised with ``norm``
    (mean, std; default computed on the training images). Returns (train, val, info)."""
    root = Path(data_dir)
    splits = {}
    for split in ("train", "val"):
        try:
            splits[split] = image_files.ImageFolder(str(root / split))
        except (FileNotFoundError, OSError) as exc:
            raise DataError(f"--experiment imagefolder: {root / split} not usable ({exc}); put the images at "
                            "DATA_DIR/train/<class>/<image> and DATA_DIR/val/<class>/<image> (the same class "
                            "folders in both)") from None
    train_classes, val_classes = set(splits["train"].classes), set(splits["val"].classes)
    if train_classes != val_classes:
        missing = [f"{split} has no folder {', '.join(sorted(other - own))}" for split, own, other in
                   (("val", val_classes, train_classes), ("train", train_classes, val_classes)) if other - own]
        raise DataError(f"--experiment imagefolder: {root}/train and {root}/val must have the same class folders: "
                        f"{'; '.join(missing)}")
    image_files.check_images(splits["train"], decode=False)
    image_files.check_images(splits["val"], decode=True)  # the whole training epoch would come before it
    mode = _image_mode(splits["train"], channels)
    base = [transforms.Resize(image_size), transforms.CenterCrop(image_size)]
    for folder in splits.values():
        folder.loader = partial(image_files.load_image, mode=mode)
    if norm is None:
        splits["train"].transform = transforms.Compose([*base, transforms.ToTensor()])
        norm = channel_stats(splits["train"])
    mean, std = (list(map(float, v)) for v in norm)
    if len(mean) != len(mode) or len(std) != len(mode):
        raise DataError(f"--mean/--std: the images have {len(mode)} channel(s) but {len(mean)} means and "
                        f"{len(std)} stds were given; pass one value per channel")
    finish = [transforms.ToTensor(), transforms.Normalize(mean, std)]
    shift = transforms.RandomCrop(image_size, padding=max(1, image_size // 8), padding_mode="reflect")
    splits["train"].transform = transforms.Compose([*base, shift, *finish])
    splits["val"].transform = transforms.Compose([*base, *finish])
    info = {"channels": len(mode), "num_classes": len(splits["train"].classes), "classes": splits["train"].classes,
            "mean": mean, "std": std}
    return splits["train"], splits["val"], info


def cifar10(data_dir: Path, fetch: bool = True) -> tuple[Dataset, Dataset]:
    """CIFAR-10 train (random crop 32/pad 4, flip, normalise) and test (normalise); ``fetch``: see `load_data`."""
    norm = [transforms.ToTensor(), transforms.Normalize(CIFAR_MEAN, CIFAR_STD)]
    train_tf = transforms.Compose([transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip(), *norm])
    try:
        with _socket_timeout(DOWNLOAD_TIMEOUT_S):
            train = datasets.CIFAR10(str(data_dir), train=True, transform=train_tf, download=fetch)
            val = datasets.CIFAR10(str(data_dir), train=False, transform=transforms.Compose(norm))
    except (OSError, RuntimeError) as exc:
        folder = Path(data_dir) / "cifar-10-batches-py"
        raise DataError(
            f"CIFAR-10 not found or damaged in {folder} and the download failed ({exc}); download "
            f"cifar-10-python.tar.gz from https://www.cs.toronto.edu/~kriz/cifar.html and extract it into {data_dir}"
        ) from None
    return train, val


def imagenet(data_dir: Path, fetch: bool = True) -> tuple[Dataset, Dataset]:
    """ImageNet from ``imagenet_raw/{train,val}``: RandomResizedCrop(224)+flip / Resize(248)+CenterCrop(224). It is
    never downloaded, whatever ``fetch`` says."""
    root = Path(data_dir) / "imagenet_raw"
    norm = [transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    tfs = {
        "train": transforms.Compose([transforms.RandomResizedCrop(224), transforms.RandomHorizontalFlip(), *norm]),
        "val": transforms.Compose([transforms.Resize(248), transforms.CenterCrop(224), *norm]),
    }
    splits = []
    for split, tf in tfs.items():
        folder = root / split
        try:
            splits.append(datasets.ImageFolder(str(folder), transform=tf))
        except (FileNotFoundError, OSError) as exc:
            raise DataError(
                f"ImageNet {split} split not usable at {folder} ({exc}); ImageNet is not downloaded: put the images "
                f"at DATA_DIR/imagenet_raw/{{train,val}}/<class>/<image> (one folder per class, the same classes "
                "in train and val)"
            ) from None
    if splits[0].classes != splits[1].classes:
        raise DataError(f"ImageNet train and val under {root} have different class folders; they must match")
    return splits[0], splits[1]


class SyntheticImages(Dataset):
    """``n`` reproducible random images with random labels; a shape stand-in for tests, never for accuracy."""

    def __init__(self, n: int, shape: tuple[int, int, int], num_classes: int, seed: int) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.images = torch.rand((n, *shape), generator=gen)
        self.targets = torch.randint(0, num_classes, (n,), generator=gen)

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.images[index], int(self.targets[index])


class Data(NamedTuple):
    """A run's datasets and what the model is built from: ``info`` holds channels, image_size, mac_shape (the
    batch-1 input MACs are counted on), num_classes, and for ImageFolder the classes and mean/std."""

    train: Dataset
    val: Dataset
    info: dict[str, Any]


def load_data(exp: Experiment, data_dir: str | Path, synthetic: int | None = None, synthetic_size: int | None = None,
              *, image_size: int | None = None, channels: int | None = None, num_classes: int | None = None,
              norm: tuple[Sequence[float], Sequence[float]] | None = None, fetch: bool = True) -> Data:
    """The datasets of ``exp`` and their ``info``; ``synthetic=N`` gives N random images per split instead (tests
    only). ``image_size`` and ``norm`` apply to ImageFolder, ``channels`` to ImageFolder and the grayscale datasets
    (3: the gray channel repeated); ``num_classes`` (default the
    experiment's, the class folders' for ImageFolder) must match the folders there. Without ``fetch`` (a folder the
    user did not name, e.g. a checkpoint's) nothing is downloaded, decompressed or created: the data must be there."""
    info: dict[str, Any] = {"channels": exp.channels, "num_classes": num_classes or exp.num_classes,
                            "classes": None, "mean": None, "std": None}
    side = image_size or exp.image_size
    if synthetic is not None:
        side = synthetic_size or side
        channels = channels or exp.channels
        shape = (channels, side, side)
        train, val = (SyntheticImages(synthetic, shape, info["num_classes"], seed=s) for s in (1, 2))
        info["channels"] = channels
    elif exp.name == "imagefolder":
        train, val, found = imagefolder(Path(data_dir), side, channels, norm)
        if num_classes is not None and num_classes != found["num_classes"]:
            raise DataError(f"--num-classes {num_classes}: {data_dir}/train has {found['num_classes']} class "
                            "folders; drop --num-classes or pass that number")
        info.update(found)
    elif exp.channels == 1:
        info["channels"] = channels or exp.channels
        train, val = mnist(Path(data_dir), fashion=exp.name == "fashion-mnist", fetch=fetch, channels=info["channels"])
    else:
        loaders = {"cifar10": cifar10, "imagenet": imagenet}
        train, val = loaders[exp.name](Path(data_dir), fetch=fetch)
    mac_side = side if exp.name == "imagefolder" or synthetic_size else exp.mac_image_size
    info.update(image_size=side, mac_shape=[1, info["channels"], mac_side, mac_side])
    return Data(train, val, info)


def build_datasets(
    exp: Experiment, data_dir: str | Path, synthetic: int | None = None, synthetic_size: int | None = None
) -> tuple[Dataset, Dataset]:
    """(train, val) datasets of ``exp`` (``load_data`` without the info)."""
    data = load_data(exp, data_dir, synthetic, synthetic_size)
    return data.train, data.val


class ShardSampler(Sampler[int]):
    """Indices ``rank, rank + world, ...`` in order: every example is evaluated exactly once across processes."""

    def __init__(self, length: int, rank: int, world: int) -> None:
        self.indices = range(rank, length, world)

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def train_loader(
    dataset: Dataset, batch_size: int, workers: int, rank: int, world: int, seed: int, pin_memory: bool
) -> DataLoader:
    """Shuffled training loader whose order depends only on (seed, epoch): call ``loader.sampler.set_epoch(e)``."""
    sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=seed, drop_last=False)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=workers,
        pin_memory=pin_memory,
        persistent_workers=False,
    )


def eval_loader(dataset: Dataset, batch_size: int, workers: int, rank: int, world: int, pin_memory: bool) -> DataLoader:
    """Evaluation loader over this process's shard of ``dataset`` (no padding, no duplicates)."""
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=ShardSampler(len(dataset), rank, world),
        num_workers=workers,
        pin_memory=pin_memory,
    )
