"""The dataloader plumbing every data module shares (worker, pinning and drop_last policy)."""

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset


class BaseDataModule(pl.LightningDataModule):
    """Holds ``train_set``/``val_set``/``test_set`` (filled by a subclass's ``setup``) and serves them.

    Subclasses set the attributes models are built from: ``num_classes``, ``in_chans``, ``img_size`` and
    ``is_sequence`` (True when a sample is a ``[T, C, H, W]`` frame sequence, then ``T`` too).
    """

    num_classes: int
    in_chans: int
    img_size: int
    is_sequence: bool = False

    def __init__(self, root: str, batch_size: int, num_workers: int, download: bool) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        self.root = root
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.download = download
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None
        self.test_set: Dataset | None = None

    def _loader(self, dataset: Dataset | None, train: bool) -> DataLoader:
        if dataset is None:
            raise RuntimeError(f"{type(self).__name__}.setup() must run before asking for a dataloader")
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=train,
            # Full batches only in training: BatchNorm on a batch of 1 fails, and mixup needs pairs.
            drop_last=train,
            num_workers=self.num_workers,
            pin_memory=torch.cuda.is_available(),
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, train=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, train=False)

    def predict_dataloader(self) -> DataLoader:
        # `predict` runs on the test split (labels are passed along and ignored).
        return self._loader(self.test_set, train=False)
