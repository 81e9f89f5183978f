"""Lightning data modules: images for online training (the default), or an activation store.

Both take ``batch_size`` in images, as the paper's recipe does (512 images = 100k patch tokens per step).
They read the backbone (input size, normalisation, layers, token set) from the model being trained.
"""

import pytorch_lightning as pl
import torch

from .images import ImageDataset, make_source
from .store import ActivationStore, StoreError, extract_activations


def _model(dm: pl.LightningDataModule):
    trainer = getattr(dm, "trainer", None)
    if trainer is None or getattr(trainer, "lightning_module", None) is None:
        raise RuntimeError(f"{type(dm).__name__} needs the model it feeds: use it through Trainer.fit")
    return trainer.lightning_module


class ImageDataModule(pl.LightningDataModule):
    """Images from ``source``: ``embedded`` (scikit-image photographs + lfw_subset, augmented to
    ``n_images``), ``folder`` (every image under ``path``) or ``nsd`` (``path`` = nsd_stimuli.hdf5)."""

    def __init__(
        self,
        source: str = "embedded",
        path: str | None = None,
        n_images: int = 300,
        seed: int = 0,
        batch_size: int = 512,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        self.source_kind, self.path, self.n_images, self.seed = source, path, n_images, seed
        self.batch_size, self.num_workers = batch_size, num_workers
        self.dataset: ImageDataset | None = None

    def setup(self, stage: str | None = None) -> None:
        bb = _model(self).backbone
        source = make_source(self.source_kind, self.path, self.n_images, self.seed)
        self.dataset = ImageDataset(source, **bb.preprocessing)

    def train_dataloader(self):
        return torch.utils.data.DataLoader(
            self.dataset,
            batch_size=self.batch_size,
            shuffle=True,
            num_workers=self.num_workers,
            drop_last=len(self.dataset) > self.batch_size,
            persistent_workers=self.num_workers > 0,
        )


class _StoreBatches(torch.utils.data.IterableDataset):
    """The store's shuffled batches; under DDP process ``rank`` of ``world_size`` takes every
    ``world_size``-th of them (all processes draw the same order from the seed), and every process the
    same number (the last ``n_batches % world_size`` are left out), so that no process waits for another."""

    def __init__(
        self,
        store: ActivationStore,
        batch_tokens: int,
        layers: list[int],
        seed: int,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        self.store, self.batch_tokens, self.layers, self.seed, self.epoch = (
            store,
            batch_tokens,
            layers,
            seed,
            0,
        )
        self.rank, self.world_size = rank, world_size

    def per_process(self) -> int:
        """Batches each process gets per epoch."""
        return self.store.n_tokens // self.batch_tokens // self.world_size

    def __iter__(self):
        self.epoch += 1  # a new order every epoch, reproducible from the seed
        batches = self.store.batches(
            self.batch_tokens, self.layers, shuffle=True, seed=self.seed + self.epoch
        )
        if self.world_size == 1:
            return batches
        last = self.per_process() * self.world_size
        return (b for i, b in enumerate(batches) if i < last and i % self.world_size == self.rank)


class StoreDataModule(ImageDataModule):
    """Train from an activation store at ``store``; if it is missing or incomplete, the images of
    ``source`` are first extracted into it with the model's backbone (resuming an interrupted run).

    A store made with other settings (backbone or its weights, layers, token set, images, their count,
    seed or input size, dtype, shard size) is refused before any work, naming what differs; with
    ``rebuild: true`` such a store is deleted and extracted again (a store with the same settings is
    still reused or resumed).

    Under DDP (``--trainer.devices N --trainer.strategy ddp``) the extraction runs once, in the first
    process of each machine (Lightning's ``prepare_data``; the others wait for it at a barrier: a long
    extraction may need a longer ``timeout`` of the DDP strategy), so one store is written; every process
    then trains on its own share of the store's batches."""

    def __init__(
        self,
        store: str,
        source: str = "embedded",
        path: str | None = None,
        n_images: int = 300,
        seed: int = 0,
        batch_size: int = 512,
        num_workers: int = 0,
        dtype: str = "float16",
        images_per_shard: int = 256,
        extract_batch_size: int = 32,
        rebuild: bool = False,
    ) -> None:
        super().__init__(source, path, n_images, seed, batch_size, num_workers)
        self.store_path, self.dtype = store, dtype
        self.images_per_shard, self.extract_batch_size = images_per_shard, extract_batch_size
        self.rebuild = rebuild
        self.store: ActivationStore | None = None

    def prepare_data(self) -> None:
        model = _model(self)
        super().setup()  # the images, for the settings check (and the extraction, if any)
        extract_activations(  # checks the store's settings first; returns at once if it is complete
            model.backbone,
            self.dataset,
            self.store_path,
            layers=model.layers,
            tokens=model.token_set,
            dtype=self.dtype,
            images_per_shard=self.images_per_shard,
            batch_size=self.extract_batch_size,
            num_workers=self.num_workers,
            device=model.device,
            progress=True,
            rebuild=self.rebuild,
        )

    def setup(self, stage: str | None = None) -> None:
        model = _model(self)
        self.store = ActivationStore(self.store_path)
        missing = sorted(set(model.layers) - set(self.store.layers))
        if missing or self.store.manifest["tokens"] != model.token_set:
            raise StoreError(
                f"store {self.store_path} has layers {self.store.layers} / tokens "
                f"{self.store.manifest['tokens']!r}; the model needs layers {missing} / {model.token_set!r}"
            )

    def train_dataloader(self):
        tokens = self.batch_size * self.store.manifest["tokens_per_image"]
        trainer = self.trainer
        data = _StoreBatches(
            self.store, tokens, list(_model(self).layers), self.seed, trainer.global_rank, trainer.world_size
        )
        return torch.utils.data.DataLoader(data, batch_size=None)
