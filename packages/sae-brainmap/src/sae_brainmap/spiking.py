"""Spiking transformers as backbones: per block, its output averaged over the T time steps, per token.

:class:`SpikeRateBackbone` is the ``spiking`` kind of :class:`~sae_brainmap.backbone.Backbone`. It wraps

- a spikecore backbone (``spikecore.models``: Spikformer, SDT, QKFormer), built by registry name with
  ``init_args`` as builder overrides, its weights from a state dict or a Lightning checkpoint; or
- any class named by ``class_path`` (``module.Class``, imported at run time as Lightning configs name
  classes, e.g. ``tdformer.TDFormerClassifier``, ``spiliformer.SpiLiFormerClassifier`` or
  ``spikecore.train.SpikingClassifier``), built from a Lightning checkpoint's saved hyper-parameters
  (``init_args`` override them) and its ``state_dict``. This package never imports those packages itself.

Checkpoints are read by :func:`spikecore.serialization.safe_torch_load` (local files, ``weights_only``,
zip checksums; no pickled objects are run), and must hold finite weights that fit the model exactly.

The activations. The model runs its own inference forward (``predict_logits`` of a LightningModule, else
``forward``) on the images, which it repeats over its T steps. A forward hook on each requested block of
the one spikecore backbone inside the model sums the block's output ``[t, B, D, N]`` over time; the layer's
activation is that sum over all T steps divided by T, laid out ``[B, N, D]`` (tokens in raster order of
the block's grid, no CLS token). For Spikformer and QKFormer the block output is a sum of spike trains
(SEW-style residuals), so this is a firing rate per token and channel; for SDT (membrane shortcut) it is
the time mean of its real-valued residual stream. A block that runs over parts of the T steps one after
the other (TDFormer's segments, with the neuron state carried) contributes each part in turn; a block that
runs again over steps it has already covered (SpiLiFormer's second pass over its last stage) is counted
from the new run only: the run whose output the model's prediction uses.
"""

import importlib
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from spikecore.errors import ConfigError
from spikecore.serialization import CheckpointError, check_finite, first_line, safe_torch_load

from .backbone import BackboneWeightsError, check_layers, select_tokens

WHAT = "spiking backbone checkpoint"
# Normalisation when neither the config nor the checkpoint's data module gives one: timm's ImageNet default.
DEFAULT_MEAN = (0.485, 0.456, 0.406)
DEFAULT_STD = (0.229, 0.224, 0.225)
_NOT_INIT_ARGS = ("_instantiator", "_class_path", "init_weights")  # Lightning / jsonargparse bookkeeping


class BackboneClassError(ConfigError):
    """A ``backbone.class_path`` that does not import, is not a model class, or cannot be built from the
    checkpoint's hyper-parameters (a :class:`spikecore.errors.ConfigError`, so a ``ValueError``)."""


def import_class(class_path: str) -> type:
    """The class ``module.Class`` names, imported; a one-line :class:`BackboneClassError` otherwise."""
    module_name, _, attr = str(class_path).rpartition(".")
    if not module_name or not attr:
        raise BackboneClassError(
            f"backbone.class_path {class_path!r} must be a dotted path module.Class, e.g. "
            "tdformer.TDFormerClassifier"
        )
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise BackboneClassError(
            f"backbone.class_path {class_path!r} does not import ({first_line(err)}): install the package "
            "that defines it (e.g. uv sync --all-packages) or correct the name"
        ) from None
    cls = getattr(module, attr, None)
    if cls is None:
        raise BackboneClassError(f"backbone.class_path {class_path!r}: module {module_name} has no {attr!r}")
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise BackboneClassError(f"backbone.class_path {class_path!r} is not a torch.nn.Module class")
    return cls


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """``{"state_dict", "hyper_parameters", "data"}`` of a Lightning checkpoint or a plain state dict,
    read safely; each failure is one :class:`~sae_brainmap.backbone.BackboneWeightsError`."""
    try:
        obj = safe_torch_load(path, what=WHAT)
    except CheckpointError as err:
        raise BackboneWeightsError(str(err)) from None
    path = Path(path).expanduser()
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        state, hparams = obj["state_dict"], obj.get("hyper_parameters") or {}
        data = obj.get("datamodule_hyper_parameters") or {}
    elif isinstance(obj, dict) and obj and all(isinstance(v, Tensor) for v in obj.values()):
        state, hparams, data = obj, {}, {}
    else:
        raise BackboneWeightsError(
            f"{WHAT} {path} holds neither a Lightning checkpoint (a 'state_dict' entry) nor a state dict "
            "of tensors"
        )
    try:
        check_finite(state, path, WHAT)
    except CheckpointError as err:
        raise BackboneWeightsError(str(err)) from None
    return {"state_dict": state, "hyper_parameters": dict(hparams), "data": dict(data)}


def load_weights(model: nn.Module, state: dict[str, Tensor], path: str | Path) -> None:
    """``state`` into ``model`` exactly (every name, every shape); a ``net.`` prefix (a LightningModule's
    network saved through its module) is dropped when the model itself is the network."""
    from spikecore.serialization import state_dict_mismatch

    own = model.state_dict()
    if set(state) != set(own) and all(k.startswith("net.") for k in state):
        stripped = {k.removeprefix("net."): v for k, v in state.items()}
        if set(stripped) == set(own):
            state = stripped
    problem = state_dict_mismatch(own, state)
    if problem:
        raise BackboneWeightsError(
            f"{path} does not fit the spiking backbone ({problem}): use the class path, name and "
            "init_args the checkpoint was trained with"
        )
    model.load_state_dict(state)


def find_spiking_backbone(model: nn.Module) -> nn.Module:
    """The one ``spikecore.models.SpikingBackbone`` inside ``model`` (the model itself, a classifier's
    ``net``, a TDFormer's or SpiLiFormer's ``backbone``)."""
    from spikecore.models import SpikingBackbone

    found = [m for m in model.modules() if isinstance(m, SpikingBackbone)]
    if len(found) != 1:
        what = "no" if not found else f"{len(found)}"
        raise BackboneClassError(
            f"{type(model).__name__} holds {what} spikecore spiking backbone(s) (spikecore.models."
            "SpikingBackbone); a spiking backbone needs exactly one, whose blocks give the layers"
        )
    return found[0]


def _number_pair(size) -> tuple[int, int]:
    return (int(size), int(size)) if np.isscalar(size) else (int(size[0]), int(size[1]))


class SpikeRateBackbone(nn.Module):
    """A frozen spiking model whose layers are its backbone's blocks, each block's activation its output
    averaged over the T steps (the module docstring says how). ``model`` is what runs (a network, or a
    LightningModule with ``predict_logits``); ``img_size`` the input size (default: the backbone's own);
    ``mean`` / ``std`` the normalisation it was trained with (default: ImageNet's)."""

    kind = "spiking"
    num_prefix_tokens = 0

    def __init__(
        self,
        model: nn.Module,
        name: str | None = None,
        img_size: int | Sequence[int] | None = None,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
    ) -> None:
        super().__init__()
        self.model = model
        self.spiking = find_spiking_backbone(model)
        if self.spiking.in_chans != 3:
            raise BackboneClassError(
                f"{type(self.spiking).__name__} takes {self.spiking.in_chans}-channel input (event frames), "
                "not RGB images: use a model trained on images"
            )
        self.name = name or type(model).__name__
        self.model.requires_grad_(False)
        self.model.eval()
        self.img_size = _number_pair(self.spiking.img_size if img_size is None else img_size)
        self.mean = tuple(float(m) for m in (DEFAULT_MEAN if mean is None else mean))
        self.std = tuple(float(s) for s in (DEFAULT_STD if std is None else std))
        self._grids = self._stage_grids()

    # -- construction from a run config ---------------------------------------------------------------
    @classmethod
    def from_config(cls, config) -> "SpikeRateBackbone":
        """From a ``backbone`` section with ``kind: spiking`` (see :func:`load_spiking_model`)."""
        model, name, data = load_spiking_model(
            config.name, config.class_path, config.checkpoint, config.init_args
        )
        mean = config.mean if config.mean is not None else data.get("mean")
        std = config.std if config.std is not None else data.get("std")
        return cls(model, name, img_size=config.img_size, mean=mean, std=std)

    # -- the protocol ----------------------------------------------------------------------------------
    @property
    def depth(self) -> int:
        return len(self.spiking.blocks)

    @property
    def embed_dim(self) -> int:
        """The width of the last block (:meth:`layer_dim` for each; stages of QKFormer differ)."""
        return int(self.spiking.block_dims[-1])

    @property
    def T(self) -> int:
        return int(self.spiking.T)

    @property
    def preprocessing(self) -> dict[str, Any]:
        return {"size": self.img_size, "mean": self.mean, "std": self.std, "crop_pct": 1.0,
                "interpolation": "bicubic", "crop_mode": "center"}  # fmt: skip

    def preprocess(self, img: np.ndarray) -> Tensor:
        from .images import to_model_input

        return to_model_input(img, **self.preprocessing)

    def layer_dim(self, layer: int) -> int:
        return int(self.spiking.block_dims[layer])

    def patch_grid(self, layer: int) -> tuple[int, int]:
        return self._grids[self.spiking.block_stage[layer]]

    def describe(self) -> dict[str, Any]:
        def path(m: nn.Module) -> str:
            return f"{type(m).__module__}.{type(m).__qualname__}"

        return {"kind": self.kind, "class": path(self.model), "backbone": path(self.spiking), "T": self.T,
                "activation": "block output, mean over T"}  # fmt: skip

    def train(self, mode: bool = True) -> "SpikeRateBackbone":
        super().train(mode)
        self.model.eval()  # frozen: BatchNorm statistics, dropout and stochastic depth stay off
        return self

    def select_tokens(self, acts: Tensor, tokens: str) -> Tensor:
        """``patch`` and ``all``: every token (a spiking backbone has no CLS token); ``cls``: an error."""
        return select_tokens(acts, tokens, 0)

    def embedding(self, acts: Tensor) -> Tensor:
        """``[B, N, D]`` -> ``[B, D]``: the token mean, the input of the spiking classifier's head."""
        return acts.mean(1)

    @torch.no_grad()
    def forward(self, images: Tensor, layers: Sequence[int] | None = None) -> dict[int, Tensor]:
        """``{layer: [B, N, D]}``: each block's output averaged over the T steps, for ``layers`` (all by
        default). The whole model runs (its own inference forward)."""
        import spikecore

        layers = check_layers(range(self.depth) if layers is None else layers, self.depth, self.name)
        if images.dim() != 4:
            raise ValueError(f"expected images [B, C, H, W], got shape {tuple(images.shape)}")
        sums: dict[int, Tensor] = {}
        steps = dict.fromkeys(layers, 0)

        def hook(i: int):
            def collect(_module, _inputs, out: Tensor) -> None:
                out = out.detach().flatten(3).float()  # [t, B, D, N] (spatial blocks flattened)
                if steps[i] >= self.T:  # a new run over steps already covered replaces the earlier one
                    steps[i] = 0
                total = out.sum(0)
                sums[i] = total if steps[i] == 0 else sums[i] + total
                steps[i] += out.shape[0]

            return collect

        handles = [self.spiking.blocks[i].register_forward_hook(hook(i)) for i in layers]
        try:
            spikecore.reset(self.model)
            run = getattr(self.model, "predict_logits", None) or self.model
            run(images)
        finally:
            for h in handles:
                h.remove()
            spikecore.reset(self.model)
        bad = {i: n for i, n in steps.items() if n != self.T}
        if bad:
            raise RuntimeError(
                f"{self.name}: blocks {sorted(bad)} ran over {sorted(set(bad.values()))} time steps, not the "
                f"model's T={self.T}: its forward does not run every block over the T steps of the input"
            )
        return {i: (sums[i] / self.T).transpose(1, 2).contiguous() for i in layers}

    # -- helpers ---------------------------------------------------------------------------------------
    @torch.no_grad()
    def _stage_grids(self) -> list[tuple[int, int]]:
        """The token grid of each stage at ``img_size``: the stem and the stage transitions on one step of
        one blank image (their convolutions and poolings decide it)."""
        import spikecore

        sp = self.spiking
        param = next(sp.parameters(), None)
        x = torch.zeros(1, 1, sp.in_chans, *self.img_size, device=param.device if param is not None else None)
        try:
            feats = sp.forward_stem(x)
            grids = [tuple(int(g) for g in feats.shape[3:])]
            for downsample in sp.downsample:
                feats = downsample(feats)
                grids.append(tuple(int(g) for g in feats.shape[3:]))
        except RuntimeError as err:
            raise BackboneClassError(
                f"{self.name} cannot take {self.img_size[0]} x {self.img_size[1]} px images "
                f"({first_line(err)}); choose another backbone.img_size"
            ) from None
        finally:
            spikecore.reset(self.model)
        if any(len(g) != 2 for g in grids):
            raise BackboneClassError(f"{self.name}: its stem does not give a 2-D token grid ({grids})")
        return grids


def load_spiking_model(
    name: str | None,
    class_path: str | None = None,
    checkpoint: str | None = None,
    init_args: dict | None = None,
) -> tuple[nn.Module, str, dict]:
    """``(model, display name, the checkpoint's data-module hyper-parameters)``.

    Without ``class_path``: ``spikecore.models.create_model(name, **init_args)``, with the weights of
    ``checkpoint`` (a state dict or a Lightning checkpoint of that network). With ``class_path``: that
    class built with the checkpoint's saved hyper-parameters updated by ``init_args``, then the
    checkpoint's weights. No checkpoint: random weights (a warning says so)."""
    init_args = dict(init_args or {})
    ckpt = read_checkpoint(checkpoint) if checkpoint else None
    if class_path is None:
        from spikecore.models import create_model

        try:
            model = create_model(name, **init_args)
        except (TypeError, ValueError) as err:
            raise BackboneClassError(f"backbone.name {name!r}: {first_line(err)}") from None
        display, kwargs = name, init_args
    else:
        cls = import_class(class_path)
        saved = {k: v for k, v in (ckpt or {}).get("hyper_parameters", {}).items() if k not in _NOT_INIT_ARGS}
        upgrade = getattr(cls, "upgrade_hparams", None)  # a class that reads older checkpoints' meanings
        if saved and callable(upgrade):
            saved = dict(upgrade(saved))
        kwargs = {**saved, **init_args}
        try:
            model = cls(**kwargs)
        except (TypeError, ValueError) as err:
            source = "the checkpoint's hyper-parameters and init_args" if saved else "init_args"
            raise BackboneClassError(
                f"backbone.class_path {class_path}: cannot build it from {source} ({first_line(err)})"
            ) from None
        arch = kwargs.get("arch")
        display = f"{cls.__name__}({arch})" if isinstance(arch, str) else cls.__name__
    if ckpt is not None:
        load_weights(model, ckpt["state_dict"], Path(checkpoint).expanduser())
    else:
        warnings.warn(
            f"{display}: no spiking backbone checkpoint given, using RANDOM weights. A randomly initialised "
            "spiking network is mostly silent and its activations are not meaningful; pass a trained "
            "checkpoint for real results.",
            UserWarning,
            stacklevel=2,
        )
    return model, display, (ckpt or {}).get("data", {})
