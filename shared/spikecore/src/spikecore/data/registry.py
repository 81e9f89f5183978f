"""Data modules by name, for scripts and configs that pick a dataset with a string."""

from typing import Any

from .base import BaseDataModule
from .cifar import CIFAR10DataModule, CIFAR100DataModule
from .digits import DigitsDataModule
from .event_digits import EventDigitsDataModule
from .imagenet import ImageNetDataModule
from .neuromorphic import CIFAR10DVSDataModule, DVSGestureDataModule, NCaltech101DataModule

DATAMODULES: dict[str, type[BaseDataModule]] = {
    "cifar10": CIFAR10DataModule,
    "cifar100": CIFAR100DataModule,
    "imagenet": ImageNetDataModule,
    "cifar10_dvs": CIFAR10DVSDataModule,
    "dvs_gesture": DVSGestureDataModule,
    "ncaltech101": NCaltech101DataModule,
    "digits": DigitsDataModule,
    "event_digits": EventDigitsDataModule,
}
DATAMODULE_NAMES: tuple[str, ...] = tuple(DATAMODULES)


def build_datamodule(name: str, **kwargs: Any) -> BaseDataModule:
    """``DATAMODULES[name](**kwargs)``; ``name`` is case-insensitive and ``-`` may stand for ``_``."""
    key = name.lower().replace("-", "_")
    if key not in DATAMODULES:
        raise ValueError(f"unknown dataset {name!r}; known: {', '.join(DATAMODULE_NAMES)}")
    return DATAMODULES[key](**kwargs)
