"""A dataset over in-memory uint8 images, shared by CIFAR and the embedded digits so both take the same
transform path."""

from collections.abc import Callable

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset


class ArrayImageDataset(Dataset):
    """``(transform(PIL image), label)`` for ``images[indices]``; ``images`` is ``[N, H, W, 3]`` uint8."""

    def __init__(
        self,
        images: np.ndarray,
        labels: np.ndarray,
        transform: Callable[[Image.Image], torch.Tensor],
        indices: np.ndarray | None = None,
    ) -> None:
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"images must be [N, H, W, 3] uint8, got {images.shape} {images.dtype}")
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        self.images = images
        self.labels = np.asarray(labels, dtype=np.int64)
        self.transform = transform
        self.indices = np.arange(len(images)) if indices is None else np.asarray(indices, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, item: int) -> tuple[torch.Tensor, int]:
        index = int(self.indices[item])
        return self.transform(Image.fromarray(self.images[index])), int(self.labels[index])
