"""CIFAR-10/100 data modules: torchvision's on-disk layout, read without plain unpickling."""

from collections.abc import Callable

from torchvision import datasets as tv_datasets
from torchvision.datasets.utils import download_and_extract_archive

from .base import BaseDataModule
from .cifar_io import CIFAR10, CIFAR100, CifarLayout, find_cifar_files, read_cifar, require_cifar
from .image_datasets import ArrayImageDataset
from .transforms import CIFAR10_MEAN, CIFAR10_STD, CIFAR100_MEAN, CIFAR100_STD, small_image_transform


class _CifarDataModule(BaseDataModule):
    """Shared by CIFAR-10 and CIFAR-100. CIFAR has an official test split, which is also served as the
    validation set (the papers report test accuracy); there is no val_split.

    Args:
        root: directory holding ``cifar-10-batches-py/`` (or ``cifar-10-batches-bin/``), resp.
            ``cifar-100-python/`` (or ``cifar-100-binary/``).
        download: fetch the python version with torchvision's downloader when missing.
        img_size: side of the served images; other than 32 resizes (bicubic) before cropping.
        crop_padding: random-crop padding in pixels (0 turns the crop off).
        hflip: horizontal-flip probability.
        auto_augment: timm RandAugment string, or None to turn it off.
        random_erasing: timm RandomErasing probability (0 turns it off).
        mean, std: normalisation; None uses the dataset's statistics.
    """

    layout: CifarLayout
    torchvision_class: type
    default_mean: tuple[float, float, float]
    default_std: tuple[float, float, float]
    in_chans = 3
    is_sequence = False

    def __init__(
        self,
        root: str = "data",
        batch_size: int = 128,
        num_workers: int = 4,
        download: bool = False,
        img_size: int = 32,
        crop_padding: int = 4,
        hflip: float = 0.5,
        auto_augment: str | None = "rand-m9-n1-mstd0.4-inc1",
        random_erasing: float = 0.25,
        mean: tuple[float, float, float] | None = None,
        std: tuple[float, float, float] | None = None,
    ) -> None:
        super().__init__(root, batch_size, num_workers, download)
        self.save_hyperparameters()
        self.num_classes = self.layout.num_classes
        self.img_size = img_size
        self.mean = mean if mean is not None else self.default_mean
        self.std = std if std is not None else self.default_std
        self.crop_padding = crop_padding
        self.hflip = hflip
        self.auto_augment = auto_augment
        self.random_erasing = random_erasing
        self.train_transform = self._transform(train=True)
        self.eval_transform = self._transform(train=False)

    def _transform(self, train: bool) -> Callable:
        return small_image_transform(
            train,
            img_size=self.img_size,
            native_size=32,
            mean=self.mean,
            std=self.std,
            crop_padding=self.crop_padding,
            hflip=self.hflip,
            auto_augment=self.auto_augment,
            random_erasing=self.random_erasing,
        )

    def prepare_data(self) -> None:
        # Runs on one process per node: the only place that downloads.
        complete = all(find_cifar_files(self.layout, self.root, t) is not None for t in (True, False))
        if complete:
            return
        if not self.download:
            require_cifar(self.layout, self.root)
        # torchvision's downloader only; its dataset classes would unpickle the files with pickle.load.
        tv = self.torchvision_class
        download_and_extract_archive(tv.url, self.root, filename=tv.filename, md5=tv.tgz_md5)
        require_cifar(self.layout, self.root)

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        require_cifar(self.layout, self.root)
        train_images, train_labels = read_cifar(self.layout, self.root, train=True)
        test_images, test_labels = read_cifar(self.layout, self.root, train=False)
        self.train_set = ArrayImageDataset(train_images, train_labels, self.train_transform)
        self.test_set = ArrayImageDataset(test_images, test_labels, self.eval_transform)
        self.val_set = self.test_set


class CIFAR10DataModule(_CifarDataModule):
    """CIFAR-10 (10 classes, 32x32 RGB). See :class:`_CifarDataModule` for the arguments."""

    layout = CIFAR10
    torchvision_class = tv_datasets.CIFAR10
    default_mean = CIFAR10_MEAN
    default_std = CIFAR10_STD


class CIFAR100DataModule(_CifarDataModule):
    """CIFAR-100 (100 fine classes, 32x32 RGB). See :class:`_CifarDataModule` for the arguments."""

    layout = CIFAR100
    torchvision_class = tv_datasets.CIFAR100
    default_mean = CIFAR100_MEAN
    default_std = CIFAR100_STD
