"""Backbones: images -> per-layer token activations, behind one small protocol (:class:`Backbone`).

Two kinds implement it:

- ``timm`` (:class:`ViTBackbone`): a timm ViT, the residual stream after each block from timm's public
  ``forward_intermediates`` (CLS and other prefix tokens kept), with timm's own per-model preprocessing
  (input size, normalisation, ``crop_pct``, interpolation; CLIP models: resize the short side, centre crop).
- ``spiking`` (:class:`~sae_brainmap.spiking.SpikeRateBackbone`): any spikecore spiking backbone, or a model
  named by class path (a TDFormer or SpiLiFormer LightningModule and its checkpoint): per block its output
  averaged over the T time steps (the spike rate) per token.

Layers are numbered from 0 (the output of ``blocks[0]``) to depth - 1 (the output of the last block,
before any final norm). For ViT-B/16 at 224 px each layer gives ``[B, 197, 768]``: token 0 is CLS and
1..196 the patches. :func:`build_backbone` makes either kind from a run config's ``backbone`` section.
"""

import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import timm
import torch
from torch import Tensor, nn

from spikecore.serialization import CheckpointError, first_line

from .images import INTERPOLATIONS

DEFAULT_BACKBONE = "vit_base_patch16_clip_quickgelu_224"  # CLIP ViT-B/16 with OpenAI's QuickGELU
TOKEN_SETS = ("patch", "cls", "all")
KINDS = ("timm", "spiking")


@runtime_checkable
class Backbone(Protocol):
    """What the pipeline, the activation store and the SAE trainer use of a backbone.

    ``backbone(images, layers)`` maps normalised images ``[B, 3, H, W]`` to ``{layer: [B, tokens, d]}``;
    ``preprocess`` turns a uint8 ``[H, W, 3]`` image into such an input (``preprocessing`` holds its
    settings, the keyword arguments of :class:`~sae_brainmap.images.ImageDataset`); ``select_tokens``
    picks ``patch`` / ``cls`` / ``all`` tokens; ``embedding`` is the per-image vector of the encoding
    baseline (a ViT's CLS token, a spiking model's token mean); ``patch_grid(layer)`` the (rows, columns)
    of a layer's patch tokens; ``describe()`` what identifies the network in a store's provenance."""

    kind: str
    name: str
    img_size: tuple[int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @property
    def depth(self) -> int: ...

    @property
    def embed_dim(self) -> int: ...

    @property
    def preprocessing(self) -> dict[str, Any]: ...

    def __call__(self, images: Tensor, layers: Sequence[int] | None = None) -> dict[int, Tensor]: ...

    def preprocess(self, img: np.ndarray) -> Tensor: ...

    def select_tokens(self, acts: Tensor, tokens: str) -> Tensor: ...

    def embedding(self, acts: Tensor) -> Tensor: ...

    def layer_dim(self, layer: int) -> int: ...

    def patch_grid(self, layer: int) -> tuple[int, int]: ...

    def describe(self) -> dict[str, Any]: ...


def build_backbone(config) -> "Backbone":
    """The backbone of a run config's ``backbone`` section (:class:`~sae_brainmap.run_config.BackboneConfig`:
    ``kind``, ``name``, ``checkpoint``, ``img_size``, ``class_path``, ``init_args``, ``mean``, ``std``).
    Random weights (no checkpoint) come from torch's current random state."""
    kind = getattr(config, "kind", "timm")
    if kind == "spiking":
        from .spiking import SpikeRateBackbone

        return SpikeRateBackbone.from_config(config)
    if kind != "timm":
        raise ValueError(f"backbone kind must be one of {KINDS}, got {kind!r}")
    kwargs = dict(getattr(config, "init_args", None) or {})
    if config.img_size:
        kwargs["img_size"] = config.img_size
    return ViTBackbone(
        config.name,
        checkpoint=config.checkpoint,
        model_kwargs=kwargs,
        mean=getattr(config, "mean", None),
        std=getattr(config, "std", None),
    )


def check_layers(layers: Sequence[int], depth: int, name: str) -> list[int]:
    """``layers`` as sorted unique ints, or a ValueError naming the ones outside ``0..depth - 1``."""
    layers = sorted({int(i) for i in layers})
    bad = [i for i in layers if not 0 <= i < depth]
    if bad:
        raise ValueError(f"layers {bad} out of range 0..{depth - 1} ({name} has {depth} blocks)")
    return layers


def select_tokens(acts: Tensor, tokens: str, num_prefix_tokens: int) -> Tensor:
    """``[B, T, d]`` -> ``[B, t, d]``: ``patch`` (CLS and other prefix tokens dropped, the authors' choice),
    ``cls`` (token 0) or ``all``."""
    if tokens == "patch":
        return acts[:, num_prefix_tokens:]
    if tokens == "cls":
        if num_prefix_tokens < 1:
            raise ValueError("tokens 'cls': this backbone has no CLS token; use patch or all")
        return acts[:, :1]
    if tokens == "all":
        return acts
    raise ValueError(f"tokens must be one of {TOKEN_SETS}, got {tokens!r}")


class BackboneWeightsError(CheckpointError):
    """A backbone checkpoint that cannot be read or does not fit the architecture (a
    :class:`spikecore.serialization.CheckpointError`, so a ``ValueError``)."""


WHAT = "backbone weights"


def _read_state_dict(path: str | Path) -> dict[str, Tensor]:
    """The tensors of a weights file, never running code from it: safetensors, a TorchScript archive
    (OpenAI's CLIP files: only its tensors, see :mod:`.torchscript`) or a ``torch.save`` file through
    :func:`spikecore.serialization.safe_torch_load` (local files only, zip checksums, no pickled objects)."""
    from spikecore.serialization import local_file, safe_torch_load, verify_zip_crc

    from .torchscript import TorchScriptReadError, is_torchscript_archive, read_torchscript_state_dict

    try:
        path = local_file(path, WHAT)
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            try:
                return load_file(str(path))
            except Exception as err:  # truncated, or not a safetensors file
                raise BackboneWeightsError(f"cannot read {WHAT} {path}: {first_line(err)}") from err
        if is_torchscript_archive(path):
            verify_zip_crc(path, WHAT)
            try:
                return read_torchscript_state_dict(path)
            except TorchScriptReadError as err:
                raise BackboneWeightsError(f"cannot read {WHAT} {path}: {err}") from err
        obj = safe_torch_load(path, what=WHAT)
    except BackboneWeightsError:
        raise
    except CheckpointError as err:
        raise BackboneWeightsError(str(err)) from err
    if not isinstance(obj, dict):
        raise BackboneWeightsError(f"{path} does not hold a state dict")
    for key in ("state_dict", "model"):  # Lightning / timm training checkpoints wrap the weights
        if isinstance(obj.get(key), dict):
            obj = obj[key]
    return obj


def load_backbone_weights(model: nn.Module, path: str | Path) -> None:
    """Load OpenAI CLIP, open_clip or timm weights into a timm ViT, converted by timm's own filter. A
    file that cannot be read, does not fit, or holds NaN or infinite weights is one
    :class:`BackboneWeightsError`."""
    from timm.models.vision_transformer import checkpoint_filter_fn

    from spikecore.serialization import check_finite

    state = _read_state_dict(path)
    path = Path(path).expanduser()
    tensors = {k: v for k, v in state.items() if isinstance(v, Tensor)}
    try:
        state = checkpoint_filter_fn(tensors, model)
    except Exception as err:
        raise BackboneWeightsError(f"{path}: timm cannot convert these weights ({first_line(err)})") from err
    # The classifier / projection head is not part of the residual stream: ignore it either way.
    state = {k: v for k, v in state.items() if not k.startswith("head.")}
    try:
        check_finite(state, path, WHAT)  # what the backbone would use
    except CheckpointError as err:
        raise BackboneWeightsError(str(err)) from err
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as err:
        raise BackboneWeightsError(
            f"{path} does not fit the backbone: {str(err).splitlines()[-1][:300]}"
        ) from err
    missing = [k for k in result.missing_keys if not k.startswith("head.")]
    if missing or result.unexpected_keys:
        raise BackboneWeightsError(
            f"{path} does not fit the backbone: missing {missing[:5]}, "
            f"unexpected {result.unexpected_keys[:5]}"
        )


class ViTBackbone(nn.Module):
    """A frozen timm ViT returning the residual stream after the selected blocks (the ``timm`` kind of
    :class:`Backbone`). Its input transform is timm's for the model (:func:`timm.data.resolve_data_config`):
    mean, std, ``crop_pct``, interpolation and crop mode, at the model's own input size (``img_size`` in
    ``model_kwargs``); ``mean`` / ``std`` replace timm's normalisation."""

    kind = "timm"

    def __init__(
        self,
        name: str = DEFAULT_BACKBONE,
        checkpoint: str | None = None,
        model_kwargs: dict | None = None,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
    ) -> None:
        super().__init__()
        self.name = name
        self.vit = timm.create_model(name, pretrained=False, num_classes=0, **(model_kwargs or {}))
        if checkpoint:
            load_backbone_weights(self.vit, checkpoint)
        else:
            warnings.warn(
                f"{name}: no backbone checkpoint given, using RANDOM weights. Activations, SAEs and brain "
                "maps from it are not meaningful; pass the path of the real weights (e.g. OpenAI's "
                "ViT-B-16.pt or an open_clip/timm file) for real results.",
                UserWarning,
                stacklevel=2,
            )
        self.vit.requires_grad_(False)
        self.vit.eval()
        cfg = timm.data.resolve_data_config({}, model=self.vit)
        self.mean = tuple(float(m) for m in (cfg["mean"] if mean is None else mean))
        self.std = tuple(float(v) for v in (cfg["std"] if std is None else std))
        self.crop_pct = float(cfg.get("crop_pct") or 1.0)
        self.interpolation = cfg.get("interpolation") or "bicubic"
        if self.interpolation not in INTERPOLATIONS:  # PIL-only filters (lanczos, box, hamming)
            warnings.warn(
                f"{name}: interpolation {self.interpolation!r} is replaced by bicubic", stacklevel=2
            )
            self.interpolation = "bicubic"
        self.crop_mode = cfg.get("crop_mode") or "center"
        self.img_size = tuple(int(s) for s in self.vit.patch_embed.img_size)

    @property
    def depth(self) -> int:
        return len(self.vit.blocks)

    @property
    def embed_dim(self) -> int:
        return self.vit.embed_dim

    @property
    def num_prefix_tokens(self) -> int:
        return self.vit.num_prefix_tokens

    @property
    def preprocessing(self) -> dict[str, Any]:
        return {"size": self.img_size, "mean": self.mean, "std": self.std, "crop_pct": self.crop_pct,
                "interpolation": self.interpolation, "crop_mode": self.crop_mode}  # fmt: skip

    def preprocess(self, img: np.ndarray) -> Tensor:
        from .images import to_model_input

        return to_model_input(img, **self.preprocessing)

    def layer_dim(self, layer: int) -> int:
        return self.embed_dim

    def patch_grid(self, layer: int | None = None) -> tuple[int, int]:
        return tuple(int(g) for g in self.vit.patch_embed.grid_size)

    def describe(self) -> dict[str, Any]:
        cls = type(self.vit)
        return {"kind": self.kind, "class": f"{cls.__module__}.{cls.__qualname__}", "name": self.name}

    def train(self, mode: bool = True) -> "ViTBackbone":
        super().train(mode)
        self.vit.eval()  # frozen: dropout and friends stay off whatever the trainer does
        return self

    @torch.no_grad()
    def forward(self, images: Tensor, layers: Sequence[int] | None = None) -> dict[int, Tensor]:
        """``{layer: [B, tokens, d]}`` for ``layers`` (all by default), stopping after the last one:
        timm's ``forward_intermediates`` (no final norm), prefix tokens put back in front of the patches."""
        layers = check_layers(range(self.depth) if layers is None else layers, self.depth, self.name)
        outs = self.vit.forward_intermediates(
            images,
            indices=layers,
            return_prefix_tokens=True,
            norm=False,
            stop_early=True,
            output_fmt="NLC",
            intermediates_only=True,
        )
        streams: dict[int, Tensor] = {}
        for i, out in zip(layers, outs, strict=True):
            if isinstance(out, tuple):  # (patch tokens, prefix tokens)
                out = torch.cat([out[1], out[0]], dim=1)
            streams[i] = out
        return streams

    def select_tokens(self, acts: Tensor, tokens: str) -> Tensor:
        """``[B, T, d]`` -> ``[B, t, d]``: ``patch`` (CLS and other prefix tokens dropped, the authors'
        choice), ``cls`` (token 0) or ``all``."""
        return select_tokens(acts, tokens, self.num_prefix_tokens)

    def embedding(self, acts: Tensor) -> Tensor:
        """``[B, T, d]`` -> ``[B, d]``: the CLS token (the patch mean for a ViT without prefix tokens)."""
        return acts[:, 0] if self.num_prefix_tokens else acts.mean(1)
