"""An on-disk activation store for datasets far larger than memory.

Layout of a store folder::

    manifest.json          what was extracted and which shards are complete (rewritten atomically)
    shard_00000.bin        raw [n_tokens, n_layers, d] in float16 or bfloat16, C order
    ...

A shard is written batch by batch to ``shard_XXXXX.bin.tmp``, fsynced, renamed, and only then listed in
the manifest: readers open only listed shards, so a half-written shard is never read, and an interrupted
extraction resumes at the first shard the manifest lacks. Memory while extracting is one batch of images,
not one shard; reading maps one shard at a time.
"""

import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

FORMAT = "sae_brainmap.store/1"
DTYPES = {"float16": (torch.float16, np.float16), "bfloat16": (torch.bfloat16, np.uint16)}


class StoreError(ValueError):
    """A store folder that is missing, foreign, or was made with other settings."""


def layer_key(layer: int) -> str:
    return f"layer_{layer:02d}"


def _write_json_atomic(path: Path, obj: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)


@torch.no_grad()
def extract_activations(
    backbone,
    dataset: torch.utils.data.Dataset,
    out: str | Path,
    layers: Sequence[int] | None = None,
    tokens: str = "patch",
    dtype: str = "float16",
    images_per_shard: int = 256,
    batch_size: int = 32,
    num_workers: int = 0,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> "ActivationStore":
    """Run ``backbone`` over ``dataset`` (image tensors) and store the selected layers' tokens in ``out``.

    Resumes an interrupted extraction with the same settings (it refuses different ones)."""
    from tqdm.auto import tqdm

    if dtype not in DTYPES:
        raise StoreError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    layers = list(range(backbone.depth)) if layers is None else sorted(int(i) for i in layers)
    n_images = len(dataset)
    settings = {
        "format": FORMAT,
        "backbone": backbone.name,
        "layers": layers,
        "tokens": tokens,
        "dtype": dtype,
        "d": backbone.embed_dim,
        "images_per_shard": images_per_shard,
        "n_images": n_images,
    }
    manifest_path = out / "manifest.json"
    if manifest_path.is_file():
        manifest = json.loads(manifest_path.read_text())
        differs = {k: (manifest.get(k), v) for k, v in settings.items() if manifest.get(k) != v}
        if differs:
            raise StoreError(f"{out} holds a store made with other settings {differs}; use another folder")
    else:
        manifest = {**settings, "tokens_per_image": None, "shards": []}
    for stale in out.glob("*.tmp"):  # leftovers of an interrupted run: never read, start them again
        stale.unlink()
    done = {s["index"] for s in manifest["shards"]}
    n_shards = (n_images + images_per_shard - 1) // images_per_shard
    todo = [i for i in range(n_shards) if i not in done]
    backbone = backbone.to(device).eval()
    torch_dtype, _ = DTYPES[dtype]
    bar = tqdm(
        total=n_images,
        initial=n_images - sum(_shard_images(i, images_per_shard, n_images) for i in todo),
        unit="img",
        desc=f"extract -> {out.name}",
        disable=not progress,
    )
    for index in todo:
        first = index * images_per_shard
        count = _shard_images(index, images_per_shard, n_images)
        subset = torch.utils.data.Subset(dataset, range(first, first + count))
        loader = torch.utils.data.DataLoader(subset, batch_size=batch_size, num_workers=num_workers)
        final = out / f"shard_{index:05d}.bin"
        tmp = final.with_name(final.name + ".tmp")
        n_tokens = 0
        with open(tmp, "wb") as f:
            for images in loader:
                streams = backbone(images.to(device), layers)
                # [B, T, d] per layer -> [B * T, L, d]: all layers of one token side by side
                acts = torch.stack([backbone.select_tokens(streams[i], tokens) for i in layers], dim=2)
                if manifest["tokens_per_image"] is None:
                    manifest["tokens_per_image"] = acts.shape[1]
                acts = acts.reshape(-1, len(layers), acts.shape[-1]).to(torch_dtype).cpu().contiguous()
                f.write(acts.view(torch.uint8).numpy().tobytes())
                n_tokens += acts.shape[0]
                bar.update(len(images))
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(final)
        manifest["shards"].append(
            {
                "index": index,
                "file": final.name,
                "first_image": first,
                "n_images": count,
                "n_tokens": n_tokens,
            }
        )
        manifest["shards"].sort(key=lambda s: s["index"])
        _write_json_atomic(manifest_path, manifest)
    bar.close()
    return ActivationStore(out)


def _shard_images(index: int, per_shard: int, n_images: int) -> int:
    return min(per_shard, n_images - index * per_shard)


class ActivationStore:
    """Read side of a store: memory-mapped shards, whole layers or shuffled batches of tokens."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        manifest = self.path / "manifest.json"
        if not manifest.is_file():
            raise StoreError(f"{self.path} is not an activation store (no manifest.json); extract one first")
        try:
            self.manifest: dict[str, Any] = json.loads(manifest.read_text())
        except json.JSONDecodeError as err:
            raise StoreError(f"{manifest} is corrupted: {err}") from err
        if self.manifest.get("format") != FORMAT:
            raise StoreError(f"{manifest} is not a {FORMAT} manifest")
        self.layers: list[int] = self.manifest["layers"]
        self.d: int = self.manifest["d"]
        self.shards = self.manifest["shards"]
        self._torch_dtype, self._np_dtype = DTYPES[self.manifest["dtype"]]
        for s in self.shards:
            size = (self.path / s["file"]).stat().st_size if (self.path / s["file"]).is_file() else -1
            expected = s["n_tokens"] * len(self.layers) * self.d * 2
            if size != expected:
                raise StoreError(
                    f"{self.path / s['file']}: {size} bytes on disk, the manifest says {expected}"
                )

    @property
    def complete(self) -> bool:
        return sum(s["n_images"] for s in self.shards) == self.manifest["n_images"]

    @property
    def n_tokens(self) -> int:
        return sum(s["n_tokens"] for s in self.shards)

    def __len__(self) -> int:
        return self.n_tokens

    def shard(self, i: int) -> np.ndarray:
        """Shard ``i`` memory-mapped, ``[n_tokens, n_layers, d]`` (bfloat16 appears as uint16)."""
        s = self.shards[i]
        shape = (s["n_tokens"], len(self.layers), self.d)
        return np.memmap(self.path / s["file"], dtype=self._np_dtype, mode="r", shape=shape)

    def _to_tensor(self, arr: np.ndarray) -> Tensor:
        t = torch.from_numpy(np.ascontiguousarray(arr))
        return t.view(torch.bfloat16) if self._torch_dtype is torch.bfloat16 else t

    def layer(self, layer: int) -> Tensor:
        """All tokens of one layer, ``[n_tokens, d]`` in the stored dtype (loads it into memory)."""
        j = self.layers.index(layer)
        return torch.cat([self._to_tensor(self.shard(i)[:, j]) for i in range(len(self.shards))])

    def batches(
        self, batch_size: int, layers: Sequence[int] | None = None, shuffle: bool = True, seed: int = 0
    ) -> Iterator[dict[str, Tensor]]:
        """``{"layer_XX": [batch_size, d] float32}`` over every token once (the last partial batch is
        dropped). Shuffling visits shards in random order and permutes tokens within each: only one shard
        is in memory at a time."""
        layers = self.layers if layers is None else list(layers)
        cols = [self.layers.index(l) for l in layers]
        gen = torch.Generator().manual_seed(seed)
        order = (
            torch.randperm(len(self.shards), generator=gen).tolist() if shuffle else range(len(self.shards))
        )
        carry: Tensor | None = None
        for i in order:
            block = self._to_tensor(self.shard(i)[:, cols]).float()  # one shard's selected layers in RAM
            if shuffle:
                block = block[torch.randperm(len(block), generator=gen)]
            if carry is not None:
                block = torch.cat([carry, block])
            n_full = len(block) // batch_size * batch_size
            for start in range(0, n_full, batch_size):
                chunk = block[start : start + batch_size]
                yield {layer_key(l): chunk[:, j] for j, l in enumerate(layers)}
            carry = block[n_full:] if n_full < len(block) else None
