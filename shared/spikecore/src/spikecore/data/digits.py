"""Embedded static-image default: scikit-learn's bundled 8x8 digits (1797 images, 10 classes), upsampled
to ``img_size`` RGB and served through the same in-memory-image dataset and transform recipe as CIFAR.
Nothing is downloaded or written; everything is derived deterministically from ``seed``."""

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits

from .base import BaseDataModule
from .image_datasets import ArrayImageDataset
from .splits import stratified_split
from .transforms import small_image_transform

DIGITS_MAX_VALUE = 16.0  # load_digits pixel values are 0..16


def digit_images(img_size: int) -> tuple[np.ndarray, np.ndarray]:
    """``(images [1797, img_size, img_size, 3] uint8, labels [1797] int64)``, bilinear upsampling."""
    digits = load_digits()
    small = torch.as_tensor(digits.images / DIGITS_MAX_VALUE, dtype=torch.float32)[:, None]
    big = F.interpolate(small, size=(img_size, img_size), mode="bilinear", align_corners=False)
    gray = (big[:, 0].clamp(0, 1) * 255).round().to(torch.uint8).numpy()
    return np.repeat(gray[..., None], 3, axis=-1), digits.target.astype(np.int64)


class DigitsDataModule(BaseDataModule):
    """scikit-learn digits as a CIFAR-like set: ``[3, img_size, img_size]`` images, 10 classes, a per-class
    train/val/test split by ``seed``.

    Args:
        root, download: unused (the data ships with scikit-learn); kept for a uniform interface.
        img_size: side of the upsampled images.
        crop_padding, hflip, auto_augment, random_erasing: the CIFAR recipe's switches (flips off by
            default: a mirrored digit is not the same digit).
        mean, std: normalisation; None uses the training split's statistics.
        val_split, test_split: held-out fractions, per class.
    """

    num_classes = 10
    in_chans = 3
    is_sequence = False

    def __init__(
        self,
        root: str = "data",
        batch_size: int = 64,
        num_workers: int = 0,
        download: bool = False,
        img_size: int = 32,
        crop_padding: int = 4,
        hflip: float = 0.0,
        auto_augment: str | None = None,
        random_erasing: float = 0.0,
        mean: tuple[float, float, float] | None = None,
        std: tuple[float, float, float] | None = None,
        val_split: float = 0.1,
        test_split: float = 0.2,
        seed: int = 0,
    ) -> None:
        super().__init__(root, batch_size, num_workers, download)
        self.save_hyperparameters()
        self.img_size = img_size
        self.crop_padding = crop_padding
        self.hflip = hflip
        self.auto_augment = auto_augment
        self.random_erasing = random_erasing
        self.mean = mean
        self.std = std
        self.val_split = val_split
        self.test_split = test_split
        self.seed = seed

    def setup(self, stage: str | None = None) -> None:
        # Generated in memory identically on every rank; nothing to download or cache in prepare_data.
        if self.train_set is not None:
            return
        images, labels = digit_images(self.img_size)
        train_idx, val_idx, test_idx = stratified_split(labels, [self.val_split, self.test_split], self.seed)
        train_pixels = images[train_idx].reshape(-1, 3) / 255.0
        self.mean = self.mean if self.mean is not None else tuple(train_pixels.mean(0).tolist())
        self.std = self.std if self.std is not None else tuple(train_pixels.std(0).tolist())

        def transform(train: bool):
            return small_image_transform(
                train,
                img_size=self.img_size,
                native_size=self.img_size,
                mean=self.mean,
                std=self.std,
                crop_padding=self.crop_padding,
                hflip=self.hflip,
                auto_augment=self.auto_augment,
                random_erasing=self.random_erasing,
            )

        self.train_set = ArrayImageDataset(images, labels, transform(train=True), train_idx)
        self.val_set = ArrayImageDataset(images, labels, transform(train=False), val_idx)
        self.test_set = ArrayImageDataset(images, labels, transform(train=False), test_idx)
