"""An on-disk activation store for datasets far larger than memory.

Layout of a store folder::

    manifest.json          what was extracted, from what, and which shards are complete (rewritten atomically)
    shard_00000.bin        raw [n_tokens, n_layers, d] in float16 or bfloat16, C order
    ...

A shard is written batch by batch to ``shard_XXXXX.bin.tmp``, fsynced, renamed, and only then listed in
the manifest: readers open only listed shards, so a half-written shard is never read, and an interrupted
extraction resumes at the first shard the manifest lacks. Memory while extracting is one batch of images,
not one shard; reading maps one shard at a time.

Provenance: the manifest records every setting that determines the store's content (see
:func:`store_settings`): the layers, token set, dtype and shard size, and what made the activations, i.e.
the backbone's name, kind and class (:meth:`~sae_brainmap.backbone.Backbone.describe`: a timm ViT's or a
spiking model's, so a store made by one kind of backbone is never read for another) and a fingerprint of
its weights (a checkpoint, or the seed of random weights, shows there), the images (source kind, count,
seed, the files' names and sizes) and their preprocessing (input size, normalisation, crop). Extracting into
a folder that holds a store made with other settings is refused before any work, naming each setting that
differs, unless ``rebuild=True`` (then that store is deleted and extracted again); with the same settings
an interrupted store resumes and a complete one is reused.
"""

import hashlib
import json
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from spikecore.errors import UserError

FORMAT = "sae_brainmap.store/1"
DTYPES = {"float16": (torch.float16, np.float16), "bfloat16": (torch.bfloat16, np.uint16)}
REBUILD_HINT = (
    "Use a new store folder, or rebuild this one (StoreDataModule rebuild: true, "
    "i.e. --data.init_args.rebuild true; extract_activations(..., rebuild=True)), which deletes its shards"
)


class StoreError(UserError, ValueError):
    """A store folder that is missing, foreign, or was made with other settings."""


def settings_hash(settings: Mapping) -> str:
    """The hash of a settings mapping, as the pipeline's stage manifests compute theirs."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]


def weights_fingerprint(module: torch.nn.Module) -> str:
    """A hash of every parameter and buffer (names, dtypes, shapes, bytes): equal for the same weights,
    whatever file or seed they came from."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        t = t.detach().cpu().contiguous().reshape(-1)
        h.update(f"{name}|{t.dtype}|{t.numel()};".encode())
        h.update(t.view(torch.uint8).numpy())
    return h.hexdigest()[:16]


def _files_digest(paths: Sequence[Path], root: Path | None) -> dict:
    """Names (relative to ``root``) and sizes, in order; not mtimes, so that copying the images elsewhere
    or touching them keeps the store."""
    entries = []
    for p in paths:
        name = p.relative_to(root).as_posix() if root is not None else p.name
        entries.append([name, p.stat().st_size if p.is_file() else None])
    return {"count": len(entries), "names_and_sizes": settings_hash({"files": entries})}


def describe_images(dataset: Any) -> dict:
    """What determines the images of ``dataset``: for :class:`~sae_brainmap.images.ImageDataset`, its
    source (kind, count, seed; for files their names and sizes) and preprocessing; for another dataset
    only its type (pass ``provenance=`` to :func:`extract_activations` to record more)."""
    from .images import EmbeddedImages, FolderImages, ImageDataset, ImageFiles, NSDImages

    if not isinstance(dataset, ImageDataset):
        return {"dataset": f"{type(dataset).__module__}.{type(dataset).__qualname__}"}
    src = dataset.source
    if isinstance(src, EmbeddedImages):
        source = {
            "kind": "embedded",
            "n_images": src.n_images,
            "seed": src.seed,
            "originals": len(src.originals),
        }
    elif isinstance(src, FolderImages):
        source = {"kind": "folder", "files": _files_digest(src.paths, src.root)}
    elif isinstance(src, ImageFiles):
        source = {"kind": "files", "files": _files_digest(src.paths, None)}
    elif isinstance(src, NSDImages):
        source = {"kind": "nsd", "dataset": src.dataset, "file_size": src.path.stat().st_size,
                  "indices": settings_hash({"indices": src.indices})}  # fmt: skip
    else:
        source = {"kind": f"{type(src).__module__}.{type(src).__qualname__}"}
    return {
        "source": source,
        "size": list(dataset.size),
        "mean": list(dataset.mean),
        "std": list(dataset.std),
        "crop_pct": dataset.crop_pct,
        "interpolation": dataset.interpolation,
        "crop_mode": dataset.crop_mode,
    }


def describe_backbone(backbone) -> dict:
    """The backbone's kind and class (its ``describe()``; a backbone without one: its type)."""
    describe = getattr(backbone, "describe", None)
    if describe is not None:
        return describe()
    return {"kind": "other", "class": f"{type(backbone).__module__}.{type(backbone).__qualname__}"}


def layers_width(backbone, layers: Sequence[int]) -> int:
    """The one width ``d`` of ``layers`` (a store holds ``[tokens, layers, d]``); a StoreError if the
    layers differ (the stages of a multi-stage spiking backbone such as QKFormer)."""
    layer_dim = getattr(backbone, "layer_dim", None)
    if layer_dim is None:
        return backbone.embed_dim
    widths = {int(i): int(layer_dim(int(i))) for i in layers}
    if len(set(widths.values())) > 1:
        raise StoreError(
            f"layers {sorted(widths)} of {backbone.name} have different widths {widths}: a store holds "
            "layers of one width (and one token grid); extract each stage into its own store"
        )
    return next(iter(widths.values()))


def store_settings(
    backbone,
    dataset: Any,
    layers: Sequence[int] | None = None,
    tokens: str = "patch",
    dtype: str = "float16",
    images_per_shard: int = 256,
    provenance: Mapping | None = None,
) -> dict:
    """Everything that determines a store's content, as its manifest records it."""
    layers = list(range(backbone.depth)) if layers is None else sorted(int(i) for i in layers)
    return {
        "format": FORMAT,
        "backbone": backbone.name,
        "layers": layers,
        "tokens": tokens,
        "dtype": dtype,
        "d": layers_width(backbone, layers),
        "images_per_shard": images_per_shard,
        "n_images": len(dataset),
        "provenance": {
            "backbone": describe_backbone(backbone),
            "backbone_weights": weights_fingerprint(backbone),
            "images": describe_images(dataset),
            "extra": dict(provenance or {}),
        },
    }


def _flat(d: Mapping, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping) and v:
            out.update(_flat(v, key + "."))
        else:
            out[key] = v
    return out


def _short(v: Any) -> str:
    text = json.dumps(v, default=str)
    return text if len(text) <= 60 else text[:57] + "..."


def settings_differences(stored: Mapping, wanted: Mapping) -> list[str]:
    """``name (store X, now Y)`` for each setting of ``wanted`` that ``stored`` records differently."""
    if "provenance" not in stored:
        return ["provenance (the store records none: it was written by an older version)"]
    a, b = _flat(stored), _flat(wanted)
    names = [k for k in b if k not in ("shards", "tokens_per_image") and a.get(k) != b[k]]
    names += [k for k in a if k.startswith("provenance.") and k not in b]
    return [
        f"{k.removeprefix('provenance.')} (store {_short(a.get(k))}, now {_short(b.get(k))})" for k in names
    ]


def _delete_store(out: Path) -> None:
    """The store's own files only (manifest first: without it the shards are never read)."""
    (out / "manifest.json").unlink(missing_ok=True)
    for f in [*out.glob("shard_*.bin"), *out.glob("*.tmp")]:
        f.unlink()


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
    provenance: Mapping | None = None,
    rebuild: bool = False,
) -> "ActivationStore":
    """Run ``backbone`` over ``dataset`` (image tensors) and store the selected layers' tokens in ``out``.

    Resumes an interrupted extraction with the same settings and reuses a complete one; a store made with
    other settings (:func:`store_settings`; ``provenance`` adds any JSON-able description of the images
    that the dataset cannot give itself) is refused with a :class:`StoreError` naming them, before any
    work, or with ``rebuild=True`` deleted and extracted again."""
    from spikecore.errors import writable_dir

    if dtype not in DTYPES:
        raise StoreError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    if tokens not in ("patch", "cls", "all"):
        raise StoreError(f"tokens must be patch, cls or all, got {tokens!r}")
    if tokens == "cls" and getattr(backbone, "num_prefix_tokens", 1) == 0:
        raise StoreError(f"tokens cls: {backbone.name} has no CLS token; use patch or all")
    if images_per_shard < 1 or batch_size < 1:
        raise StoreError(
            f"images_per_shard and batch_size must be at least 1, got {images_per_shard}, {batch_size}"
        )
    if layers is not None and len(layers) == 0:
        raise StoreError("layers is empty: give at least one layer (or None for all)")
    bad = [i for i in (layers or []) if not 0 <= int(i) < backbone.depth]
    if bad:
        raise StoreError(f"layers {bad} out of range 0..{backbone.depth - 1} for {backbone.name}")
    if len(dataset) == 0:
        raise StoreError("the dataset holds no images: nothing to extract")
    out = writable_dir(out, "activation store folder")
    settings = store_settings(backbone, dataset, layers, tokens, dtype, images_per_shard, provenance)
    layers, n_images = settings["layers"], settings["n_images"]
    manifest_path = out / "manifest.json"
    manifest = _read_manifest(manifest_path) if manifest_path.is_file() else None
    if manifest is not None:
        differs = settings_differences(manifest, settings)
        if differs and not rebuild:
            raise StoreError(
                f"activation store {out} was made with other settings: {'; '.join(differs)}. {REBUILD_HINT}"
            )
        if differs:
            _delete_store(out)
            manifest = None
    if manifest is None:
        manifest = {
            **settings,
            "settings_hash": settings_hash(settings),
            "tokens_per_image": None,
            "shards": [],
        }
    for stale in out.glob("*.tmp"):  # leftovers of an interrupted run: never read, start them again
        stale.unlink()
    done = {s["index"] for s in manifest["shards"]}
    n_shards = (n_images + images_per_shard - 1) // images_per_shard
    todo = [i for i in range(n_shards) if i not in done]
    if not todo:
        return ActivationStore(out)
    from tqdm.auto import tqdm

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


def _read_manifest(path: Path) -> dict:
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise StoreError(
            f"{path} is corrupted ({err}): use a new store folder, or delete this folder's manifest.json and "
            "shard_*.bin files"
        ) from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise StoreError(f"{path} is not a {FORMAT} manifest: this folder holds something else; use another")
    return manifest


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
