"""LightningDataModules shared by the training packages: CIFAR-10/100, ImageNet, the tonic event sets
(CIFAR10-DVS, DVS128 Gesture, N-Caltech101) and two embedded, download-free defaults (scikit-learn digits
as images and as generated events).

Static images are ``[3, H, W]``; event sets are ``[T, 2, H, W]`` float event counts (``is_sequence``).
"""

from .base import BaseDataModule
from .cifar import CIFAR10DataModule, CIFAR100DataModule
from .digits import DigitsDataModule
from .errors import DatasetNotFoundError
from .event_digits import EventDigitsDataModule
from .events import events_to_frames
from .imagenet import ImageNetDataModule
from .neuromorphic import CIFAR10DVSDataModule, DVSGestureDataModule, NCaltech101DataModule
from .safe_pickle import UnsafePickleError, load_restricted

__all__ = [
    "BaseDataModule",
    "CIFAR10DVSDataModule",
    "CIFAR10DataModule",
    "CIFAR100DataModule",
    "DVSGestureDataModule",
    "DatasetNotFoundError",
    "DigitsDataModule",
    "EventDigitsDataModule",
    "ImageNetDataModule",
    "NCaltech101DataModule",
    "UnsafePickleError",
    "events_to_frames",
    "load_restricted",
]
