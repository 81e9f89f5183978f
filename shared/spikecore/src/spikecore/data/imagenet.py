"""ImageNet (or any subset in the same layout) from class folders, with timm's ImageNet recipe."""

from pathlib import Path

from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import IMG_EXTENSIONS

from .base import BaseDataModule
from .errors import DatasetNotFoundError, missing_dataset_message
from .transforms import large_image_transform


class ImageNetDataModule(BaseDataModule):
    """``root/train/<class>/*.JPEG`` and ``root/val/<class>/*.JPEG`` (torchvision ImageFolder); ``val``
    is served for validation and test.

    ImageNet cannot be downloaded (licence): ``download`` is accepted for a uniform interface and has
    no effect. ``num_classes`` must match the class folders (e.g. 100 for ImageNet-100).

    Args:
        img_size: training crop and evaluation size (224, 288, 384, ...).
        crop_pct: evaluation centre-crop fraction (resize to ``img_size / crop_pct`` first).
        hflip, auto_augment, random_erasing: timm ``create_transform`` options.
        interpolation: resize interpolation ("bicubic", "bilinear", ...).
    """

    in_chans = 3
    is_sequence = False

    def __init__(
        self,
        root: str = "data/imagenet",
        batch_size: int = 128,
        num_workers: int = 8,
        download: bool = False,
        img_size: int = 224,
        num_classes: int = 1000,
        crop_pct: float = 0.875,
        hflip: float = 0.5,
        auto_augment: str | None = "rand-m9-mstd0.5-inc1",
        random_erasing: float = 0.25,
        interpolation: str = "bicubic",
        mean: tuple[float, float, float] = IMAGENET_DEFAULT_MEAN,
        std: tuple[float, float, float] = IMAGENET_DEFAULT_STD,
    ) -> None:
        super().__init__(root, batch_size, num_workers, download)
        self.save_hyperparameters()
        self.img_size = img_size
        self.num_classes = num_classes
        common = dict(
            img_size=img_size,
            mean=mean,
            std=std,
            hflip=hflip,
            auto_augment=auto_augment,
            random_erasing=random_erasing,
            crop_pct=crop_pct,
            interpolation=interpolation,
        )
        self.train_transform = large_image_transform(train=True, **common)
        self.eval_transform = large_image_transform(train=False, **common)

    def layout(self) -> str:
        return f"  {Path(self.root, 'train')}/<class>/*.JPEG\n  {Path(self.root, 'val')}/<class>/*.JPEG"

    def _require(self) -> None:
        for split in ("train", "val"):
            split_dir = Path(self.root, split)
            has_class = split_dir.is_dir() and any(
                d.is_dir() and any(f.suffix.lower() in IMG_EXTENSIONS for f in d.iterdir())
                for d in split_dir.iterdir()
            )
            if not has_class:
                raise DatasetNotFoundError(
                    missing_dataset_message(
                        "ImageNet",
                        self.root,
                        self.layout(),
                        f"no class folders with images in {split_dir}",
                        downloadable=False,
                    )
                )

    def prepare_data(self) -> None:
        self._require()

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        self._require()
        train = ImageFolder(str(Path(self.root, "train")), transform=self.train_transform)
        val = ImageFolder(str(Path(self.root, "val")), transform=self.eval_transform)
        if train.classes != val.classes:
            raise ValueError(
                f"train and val class folders differ under {self.root!r}: "
                f"{len(train.classes)} vs {len(val.classes)} classes"
            )
        if len(train.classes) != self.num_classes:
            raise ValueError(
                f"num_classes={self.num_classes} but {len(train.classes)} class folders found in "
                f"{Path(self.root, 'train')}"
            )
        self.train_set, self.val_set, self.test_set = train, val, val
