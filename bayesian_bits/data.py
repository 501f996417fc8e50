"""Datasets and loaders of the three experiments (SPEC B §6.5), plus synthetic stand-ins for tests.

MNIST and CIFAR-10 are read with torchvision from ``DATA_DIR`` (downloaded there when missing; MNIST's files are
checked against their canonical MD5s); ImageNet is read from ``DATA_DIR/imagenet_raw/{train,val}/<class>/``.
The "val" split of every experiment is its test/val set, as in the reference. A missing or damaged dataset is a
``DataError`` that says what was looked for and how to provide it.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset, Sampler
from torch.utils.data.distributed import DistributedSampler
from torchvision import datasets, transforms

from .errors import DataError
from .experiments import Experiment
from .mnist_files import ensure_mnist

CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
DOWNLOAD_TIMEOUT_S = 60


@contextmanager
def _socket_timeout(seconds: float) -> Iterator[None]:
    old = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(old)


def mnist(data_dir: Path) -> tuple[Dataset, Dataset]:
    """MNIST train/test with ``ToTensor`` only (no normalisation)."""
    ensure_mnist(data_dir)
    tf = transforms.ToTensor()
    return (
        datasets.MNIST(str(data_dir), train=True, transform=tf),
        datasets.MNIST(str(data_dir), train=False, transform=tf),
    )


def cifar10(data_dir: Path) -> tuple[Dataset, Dataset]:
    """CIFAR-10 train (random crop 32/pad 4, flip, normalise) and test (normalise)."""
    norm = [transforms.ToTensor(), transforms.Normalize(CIFAR_MEAN, CIFAR_STD)]
    train_tf = transforms.Compose([transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip(), *norm])
    try:
        with _socket_timeout(DOWNLOAD_TIMEOUT_S):
            train = datasets.CIFAR10(str(data_dir), train=True, transform=train_tf, download=True)
            val = datasets.CIFAR10(str(data_dir), train=False, transform=transforms.Compose(norm))
    except (OSError, RuntimeError) as exc:
        folder = Path(data_dir) / "cifar-10-batches-py"
        raise DataError(
            f"CIFAR-10 not found or damaged in {folder} and the download failed ({exc}); download "
            f"cifar-10-python.tar.gz from https://www.cs.toronto.edu/~kriz/cifar.html and extract it into {data_dir}"
        ) from None
    return train, val


def imagenet(data_dir: Path) -> tuple[Dataset, Dataset]:
    """ImageNet from ``imagenet_raw/{train,val}``: RandomResizedCrop(224)+flip / Resize(248)+CenterCrop(224)."""
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


def build_datasets(
    exp: Experiment, data_dir: str | Path, synthetic: int | None = None, synthetic_size: int | None = None
) -> tuple[Dataset, Dataset]:
    """(train, val) datasets of ``exp``; ``synthetic=N`` gives N random images per split instead (tests only)."""
    if synthetic is not None:
        side = synthetic_size or exp.image_size
        shape = (exp.channels, side, side)
        return (
            SyntheticImages(synthetic, shape, exp.num_classes, seed=1),
            SyntheticImages(synthetic, shape, exp.num_classes, seed=2),
        )
    data_dir = Path(data_dir)
    loaders = {"mnist": mnist, "cifar10": cifar10, "imagenet": imagenet}
    return loaders[exp.name](data_dir)


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
