"""The papers' augmentation recipes, assembled from timm/torchvision parts (nothing hand-written except
the event-frame flip/roll, which has no library equivalent for ``[T, C, H, W]`` tensors).

Mixup/CutMix and label smoothing are batch-level and live in the LightningModule; samples here stay
``(tensor, int label)`` so those can be applied on top.
"""

from collections.abc import Callable, Sequence

import torch
from timm.data import create_transform, rand_augment_transform
from timm.data.random_erasing import RandomErasing
from torchvision import transforms as T

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)


def small_image_transform(
    train: bool,
    img_size: int,
    native_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    crop_padding: int = 4,
    hflip: float = 0.5,
    auto_augment: str | None = None,
    random_erasing: float = 0.0,
) -> Callable:
    """The CIFAR recipe for PIL images: [resize], random crop with padding, flip, RandAugment,
    normalise, random erasing. Evaluation only resizes (when ``img_size != native_size``) and normalises.
    """
    ops: list[Callable] = []
    if img_size != native_size:
        ops.append(T.Resize(img_size, interpolation=T.InterpolationMode.BICUBIC))
    if train:
        if crop_padding > 0:
            ops.append(T.RandomCrop(img_size, padding=crop_padding))
        if hflip > 0:
            ops.append(T.RandomHorizontalFlip(hflip))
        if auto_augment:
            ops.append(rand_augment(auto_augment, img_size, mean))
    ops += [T.ToTensor(), T.Normalize(mean, std)]
    if train and random_erasing > 0:
        # Per-pixel random values, as in timm's recipes (--remode pixel); after normalisation on purpose.
        ops.append(RandomErasing(probability=random_erasing, mode="pixel", max_count=1, device="cpu"))
    return T.Compose(ops)


def rand_augment(config: str, img_size: int, mean: Sequence[float]) -> Callable:
    """timm's RandAugment from a config string such as ``"rand-m9-n1-mstd0.4-inc1"``, with the
    hyper-parameters timm's own factory derives from image size and mean."""
    if not config.startswith("rand"):
        raise ValueError(f"auto_augment must be a timm RandAugment string ('rand-...'), got {config!r}")
    hparams = {"translate_const": int(img_size * 0.45), "img_mean": tuple(round(255 * m) for m in mean)}
    return rand_augment_transform(config, hparams)


def large_image_transform(
    train: bool,
    img_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    hflip: float = 0.5,
    auto_augment: str | None = None,
    random_erasing: float = 0.0,
    crop_pct: float = 0.875,
    interpolation: str = "bicubic",
) -> Callable:
    """The ImageNet recipe, straight from ``timm.data.create_transform``: random-resized crop, flip,
    RandAugment, normalise, random erasing for training; resize + centre crop for evaluation."""
    return create_transform(
        img_size,
        is_training=train,
        hflip=hflip,
        auto_augment=auto_augment,
        re_prob=random_erasing,
        re_mode="pixel",
        re_count=1,
        interpolation=interpolation,
        mean=tuple(mean),
        std=tuple(std),
        crop_pct=crop_pct,
    )


class EventFrameAugment:
    """The SDT/Spikformer DVS recipe on ``[T, C, H, W]`` frames: a horizontal flip and a random roll of
    up to ``max_shift`` pixels in each spatial direction, the same for every time step of a sample."""

    def __init__(self, hflip: float = 0.5, max_shift: int = 5) -> None:
        if not 0 <= hflip <= 1:
            raise ValueError(f"hflip must be a probability, got {hflip}")
        if max_shift < 0:
            raise ValueError(f"max_shift must be >= 0, got {max_shift}")
        self.hflip = hflip
        self.max_shift = max_shift

    def __call__(self, frames: torch.Tensor) -> torch.Tensor:
        # torch's global generator: Lightning/DataLoader seed it per worker, so workers differ.
        if self.hflip > 0 and torch.rand(()) < self.hflip:
            frames = frames.flip(-1)
        if self.max_shift > 0:
            dy, dx = torch.randint(-self.max_shift, self.max_shift + 1, (2,)).tolist()
            frames = frames.roll(shifts=(dy, dx), dims=(-2, -1))
        return frames

    def __repr__(self) -> str:
        return f"{type(self).__name__}(hflip={self.hflip}, max_shift={self.max_shift})"
