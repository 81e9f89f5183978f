"""A timm ViT as a frozen feature extractor: the residual stream after each block, in one pass.

Layers are numbered from 0 (the output of ``blocks[0]``) to depth - 1 (the output of the last block,
before the final norm). For ViT-B/16 at 224 px each layer gives ``[B, 197, 768]``: token 0 is CLS and
1..196 the patches.
"""

import warnings
from collections.abc import Sequence
from pathlib import Path

import timm
import torch
from torch import Tensor, nn

from spikecore.serialization import CheckpointError, first_line

DEFAULT_BACKBONE = "vit_base_patch16_clip_quickgelu_224"  # CLIP ViT-B/16 with OpenAI's QuickGELU
TOKEN_SETS = ("patch", "cls", "all")


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
    """A frozen timm ViT returning the residual stream after the selected blocks."""

    def __init__(
        self,
        name: str = DEFAULT_BACKBONE,
        checkpoint: str | None = None,
        model_kwargs: dict | None = None,
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
        self.mean, self.std = tuple(cfg["mean"]), tuple(cfg["std"])
        self.img_size = tuple(self.vit.patch_embed.img_size)

    @property
    def depth(self) -> int:
        return len(self.vit.blocks)

    @property
    def embed_dim(self) -> int:
        return self.vit.embed_dim

    @property
    def num_prefix_tokens(self) -> int:
        return self.vit.num_prefix_tokens

    def train(self, mode: bool = True) -> "ViTBackbone":
        super().train(mode)
        self.vit.eval()  # frozen: dropout and friends stay off whatever the trainer does
        return self

    @torch.no_grad()
    def forward(self, images: Tensor, layers: Sequence[int] | None = None) -> dict[int, Tensor]:
        """``{layer: [B, tokens, d]}`` for ``layers`` (all by default), stopping after the last one."""
        layers = list(range(self.depth)) if layers is None else [int(i) for i in layers]
        bad = [i for i in layers if not 0 <= i < self.depth]
        if bad:
            raise ValueError(f"layers {bad} out of range 0..{self.depth - 1}")
        v = self.vit
        x = v.norm_pre(v.patch_drop(v._pos_embed(v.patch_embed(images))))
        out: dict[int, Tensor] = {}
        wanted = set(layers)
        for i, block in enumerate(v.blocks[: max(layers) + 1]):
            x = block(x)
            if i in wanted:
                out[i] = x
        return out

    def select_tokens(self, acts: Tensor, tokens: str) -> Tensor:
        """``[B, T, d]`` -> ``[B, t, d]``: ``patch`` (CLS and other prefix tokens dropped, the authors'
        choice), ``cls`` (token 0) or ``all``."""
        if tokens == "patch":
            return acts[:, self.num_prefix_tokens :]
        if tokens == "cls":
            return acts[:, :1]
        if tokens == "all":
            return acts
        raise ValueError(f"tokens must be one of {TOKEN_SETS}, got {tokens!r}")
