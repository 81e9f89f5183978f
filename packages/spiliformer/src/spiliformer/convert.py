"""The authors' released SpiLiFormer checkpoints in this package's models.

The reference code (github.com/KirinZheng/SpiLiFormer, one ``model.py`` per dataset and
``imagetnet_1k/spiliformer.py``) saves ``{'model': state_dict, ...}`` (training checkpoints also hold the
optimiser and an ``argparse.Namespace`` of the arguments). :func:`load_authors_checkpoint` reads such a
file with spikecore's safe reader (``weights_only``: tensors, plain containers and the arguments'
``Namespace``, nothing that runs code), recognises which of the five variants it is, maps the parameter
names onto :class:`~spiliformer.SpiLiFormer` and rearranges the two channel layouts that differ:

- **FF-LiDiff Q.** The reference splits Q into ``2 * heads`` groups of ``d/2`` channels, the excitatory
  halves of all heads in the first ``C/2`` channels and the inhibitory halves in the second: head ``h``'s
  excitatory channel ``j`` is ``h*d/2 + j``, its inhibitory one ``C/2 + h*d/2 + j``. spikecore's
  FF-LiDiff gives each head ``d`` contiguous channels, excitatory half first (``h*d + j`` and
  ``h*d + d/2 + j``). The rows of ``q_conv`` and ``q_bn`` are permuted accordingly.
- **CIFAR10-DVS K^T V difference.** The reference reshapes the ``2C`` channels of K and V into
  ``2 * heads`` blocks of ``d``; head ``h`` subtracts the map of block ``2h+1`` from that of block ``2h``.
  :class:`~spiliformer.attention.KVDifferenceAttention` gives head ``h`` the channels ``2hd .. 2hd+2d-1``
  and takes the even ones as the first map, the odd ones as the second. The rows of ``k_conv``, ``k_bn``,
  ``v_conv`` and ``v_bn`` are permuted accordingly.

Everything else maps by name (``Conv2d`` 1x1 MLP weights become ``Conv1d`` weights; the two 1-D prompts
become the generator's ``[2, C]`` ``prompts``). Every failure (not an authors' checkpoint, keys that do
not map, shapes that do not fit the model) is one :class:`spikecore.serialization.CheckpointError`.
"""

import argparse
import os
import re
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from spikecore.serialization import CheckpointError, check_finite, safe_torch_load, state_dict_mismatch

from .attention import KVDifferenceAttention
from .model import SpiLiFormer

__all__ = [
    "VARIANTS",
    "authors_state_dict",
    "authors_variant",
    "convert_state_dict",
    "load_authors_checkpoint",
    "save_lightning_checkpoint",
]

# The five reference files and the model options each one builds (heads, T and image size are the
# published models'; a config can change them).
VARIANTS: dict[str, dict[str, Any]] = {
    "cifar10": dict(arch="spiliformer_4_384", T=4, heads=8, img_size=32, beta=0.8, options=dict(aug=1.0)),
    "cifar100": dict(
        arch="spiliformer_4_384",
        T=4,
        heads=8,
        img_size=32,
        beta=0.8,
        options=dict(aug=2.0, decoder_bn_first=True),
    ),
    "cifar10dvs": dict(
        arch="spiliformer_2_256_dvs",
        T=16,
        heads=16,
        img_size=128,
        beta={"start": 0.5, "end": 0.8},
        options=dict(aug=1.0, kv_diff=True, decoder_bn=False),
    ),
    "ncaltech101": dict(
        arch="spiliformer_2_256_dvs",
        T=16,
        heads=16,
        img_size=128,
        beta=0.5,
        options=dict(aug=1.0, kv_diff=False, decoder_bn=True),
    ),
    "imagenet": dict(arch="spiliformer_10_768", T=4, heads=12, img_size=224, beta=0.5, options=dict(aug=1.0)),
}

_STAGE_ATTN = re.compile(r"^stage(\d+)\.(\d+)\.(tssa|ssa|attn)\.(.+)$")
_STAGE_MLP = re.compile(r"^stage(\d+)\.(\d+)\.mlp\.(mlp|fc)([12])_(conv|bn)\.(.+)$")
_EMBED = re.compile(r"^patch_embed(\d+)\.(proj\d*|proj_res)_(conv|bn)\.(.+)$")
_DECODER = re.compile(r"^(?:decoder_stage_\d+|decoder\.0)\.(\d+)\.decoder_(linear|bn)\.(.+)$")


# -- reading -------------------------------------------------------------------------------------------------
def authors_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The model weights of an authors' checkpoint file (``{'model': ...}``, a bare state dict, or a
    DDP-prefixed one), read without running code; a :class:`CheckpointError` if it is not one."""
    with torch.serialization.safe_globals([argparse.Namespace]):  # the training scripts save their args
        obj = safe_torch_load(path, "authors' checkpoint")
    state = obj
    if isinstance(obj, dict):
        for key in ("model", "state_dict", "module"):
            if isinstance(obj.get(key), dict):
                state = obj[key]
                break
    if (
        not isinstance(state, dict)
        or not state
        or not all(isinstance(v, torch.Tensor) for v in state.values())
    ):
        raise CheckpointError(
            f"{path} is not a checkpoint of the authors' SpiLiFormer code: expected a state dict of tensors, "
            "alone or under 'model'"
        )
    state = {k.removeprefix("module."): v for k, v in state.items()}
    if any(k.startswith("net.") for k in state):
        raise CheckpointError(
            f"{path} is a checkpoint of this package, not of the authors' code: use it directly "
            "(--ckpt_path or --model.init_weights)"
        )
    missing = [k for k in ("prompt", "prompt_2", "head.weight") if k not in state]
    if missing:
        raise CheckpointError(
            f"{path} is not a checkpoint of the authors' SpiLiFormer code: it has no {missing} (the prompts "
            "and head every reference model holds)"
        )
    check_finite(state, path, "authors' checkpoint")
    return state


def authors_variant(state: dict[str, torch.Tensor]) -> str:
    """Which reference file the weights come from: ``cifar10``, ``cifar100``, ``cifar10dvs``,
    ``ncaltech101`` or ``imagenet``. CIFAR-10 and CIFAR-100 files build the same parameters; the head's
    100 classes decide (pass the variant explicitly otherwise)."""
    if any(k.startswith("decoder.0.") for k in state):
        return "imagenet"
    if any(k.startswith("decoder_stage_2.") for k in state):
        k = state.get("stage2.0.ssa.k_conv.weight")
        if k is None:
            raise CheckpointError("an authors' DVS checkpoint without stage2.0.ssa.k_conv.weight")
        return "cifar10dvs" if k.shape[0] == 2 * k.shape[1] else "ncaltech101"
    if any(k.startswith("decoder_stage_3.") for k in state):
        return "cifar100" if state["head.weight"].shape[0] == 100 else "cifar10"
    raise CheckpointError(
        "not an authors' SpiLiFormer state dict: no feedback decoders (decoder_stage_3 / decoder_stage_2 / "
        "decoder.0)"
    )


# -- architecture from the weights ---------------------------------------------------------------------------
def _blocks_per_stage(state: dict[str, torch.Tensor]) -> dict[int, int]:
    found: dict[int, set[int]] = {}
    for key in state:
        m = _STAGE_ATTN.match(key)
        if m:
            found.setdefault(int(m.group(1)), set()).add(int(m.group(2)))
    return {s: len(found[s]) for s in sorted(found)}


def inferred_hparams(state: dict[str, torch.Tensor], variant: str) -> dict[str, Any]:
    """SpiLiFormerClassifier hyper-parameters for the authors' model in ``state``: the variant's published
    settings (heads, T, image size, beta, feedback options) with the widths, depths, MLP ratio and classes
    read from the weights."""
    spec = VARIANTS[variant]
    depths = _blocks_per_stage(state)
    dims = [int(state[f"stage{s}.0.{_attn_name(state, s)}.q_conv.weight"].shape[0]) for s in depths]
    hidden = state[f"stage{next(iter(depths))}.0.mlp.{_mlp_prefix(state)}1_conv.weight"].shape[0]
    arch_kwargs = dict(
        embed_dims=dims,
        depths=[depths[s] for s in depths],
        num_heads=spec["heads"],
        mlp_ratio=float(hidden) / dims[0],
        img_size=spec["img_size"],
    )
    return dict(
        arch=spec["arch"],
        num_classes=int(state["head.weight"].shape[0]),
        T=spec["T"],
        beta=spec["beta"],
        arch_kwargs=arch_kwargs,
        **spec["options"],
    )


def _attn_name(state: dict[str, torch.Tensor], stage: int) -> str:
    for name in ("tssa", "ssa", "attn"):
        if f"stage{stage}.0.{name}.q_conv.weight" in state:
            return name
    raise CheckpointError(f"an authors' checkpoint without the attention of stage {stage}")


def _mlp_prefix(state: dict[str, torch.Tensor]) -> str:
    return "fc" if any(".mlp.fc1_conv." in k for k in state) else "mlp"


# -- names and layouts ---------------------------------------------------------------------------------------
def ff_lidiff_permutation(dim: int, heads: int) -> torch.Tensor:
    """``perm[ours] = theirs`` for the FF-LiDiff Q channels (see the module docstring)."""
    d = dim // heads
    h, half, j = torch.meshgrid(torch.arange(heads), torch.arange(2), torch.arange(d // 2), indexing="ij")
    return (half * (dim // 2) + h * (d // 2) + j).reshape(-1)


def kv_difference_permutation(dim: int, heads: int) -> torch.Tensor:
    """``perm[ours] = theirs`` for the ``2C`` K / V channels of the CIFAR10-DVS FB block."""
    d = dim // heads
    h, j, s = torch.meshgrid(torch.arange(heads), torch.arange(d), torch.arange(2), indexing="ij")
    return ((2 * h + s) * d + j).reshape(-1)


def _our_name(key: str, stage_offset: dict[int, int], stem_convs: int) -> str | None:
    """The parameter of :class:`SpiLiFormer` an authors' key maps to (None: no counterpart)."""
    if key == "head.weight" or key == "head.bias":
        return f"backbone.{key}"
    m = _STAGE_ATTN.match(key)
    if m:
        stage, j, _, rest = int(m.group(1)), int(m.group(2)), m.group(3), m.group(4)
        return f"backbone.blocks.{stage_offset[stage] + j}.attn.{rest}"
    m = _STAGE_MLP.match(key)
    if m:
        stage, j, _, n, kind, rest = m.groups()
        return f"backbone.blocks.{stage_offset[int(stage)] + int(j)}.mlp.fc{n}_{kind}.{rest}"
    m = _EMBED.match(key)
    if m:
        embed, proj, kind, rest = int(m.group(1)), m.group(2), m.group(3), m.group(4)
        if proj == "proj_res":
            conv = "shortcut"
        else:
            k = int(proj[4:] or 0)
            if embed > 1:  # proj / proj3 -> the first conv, proj4 -> the second
                k = 0 if k in (0, 3) else 1 if k == 4 else -1
            conv = f"proj.{k}" if 0 <= k < (stem_convs if embed == 1 else 2) else None
        if conv is None:
            return None
        where = "patch_embed" if embed == 1 else f"downsample.{embed - 2}"
        return f"backbone.{where}.{conv}.{kind}.{rest}"
    m = _DECODER.match(key)
    if m:
        i, kind, rest = m.groups()
        return f"generator.decoders.{i}.{'linear' if kind == 'linear' else 'bn'}.{rest}"
    return None


def convert_state_dict(
    state: dict[str, torch.Tensor], model: SpiLiFormer, source: str | Path = "authors' checkpoint"
) -> dict[str, torch.Tensor]:
    """The authors' weights as a state dict of ``model`` (names mapped, layouts permuted); a
    :class:`CheckpointError` naming the keys that do not map or the shapes that do not fit ``model``."""
    if not isinstance(model, SpiLiFormer):
        raise CheckpointError(
            f"{source}: the authors' weights fit a SpiLiFormer, not a {type(model).__name__}"
        )
    own = model.state_dict()
    depths = _blocks_per_stage(state)
    stage_offset, total = {}, 0
    for s, n in depths.items():
        stage_offset[s] = total
        total += n
    stem_convs = len(model.backbone.patch_embed.proj)
    out: dict[str, torch.Tensor] = {
        "generator.prompts": torch.stack([state["prompt"], state["prompt_2"]]).clone()
    }
    unmapped = []
    for key, value in state.items():
        if key in ("prompt", "prompt_2"):
            continue
        ours = _our_name(key, stage_offset, stem_convs)
        if ours is None:
            unmapped.append(key)
            continue
        if ours.endswith("_conv.weight") and ".mlp." in ours and value.dim() == 4:
            value = value.flatten(2)  # Conv2d 1x1 -> Conv1d
        out[ours] = value.clone()
    not_mapped = sorted(set(out) - set(own)) + unmapped  # names ours lacks, or none of ours at all
    fitting = {k: v for k, v in out.items() if k in own}
    detail = state_dict_mismatch(own, fitting, extra={"not mapped": not_mapped})
    if detail:
        raise CheckpointError(
            f"{source} does not fit this model ({detail}): use the config of the experiment it comes from"
        )
    for i, block in enumerate(model.backbone.blocks):
        attn = block.attn
        prefix = f"backbone.blocks.{i}.attn."
        if type(attn).__name__ == "FFLiDiffAttention":
            _permute(out, prefix, ("q",), ff_lidiff_permutation(attn.dim, attn.num_heads))
        elif isinstance(attn, KVDifferenceAttention):
            _permute(out, prefix, ("k", "v"), kv_difference_permutation(attn.dim, attn.num_heads))
    return out


def _permute(out: dict[str, torch.Tensor], prefix: str, branches: Sequence[str], perm: torch.Tensor) -> None:
    for b in branches:
        for name in (
            f"{b}_conv.weight",
            f"{b}_bn.weight",
            f"{b}_bn.bias",
            f"{b}_bn.running_mean",
            f"{b}_bn.running_var",
        ):
            out[prefix + name] = out[prefix + name][perm].contiguous()


# -- the model and the Lightning checkpoint ------------------------------------------------------------------
def config_model_hparams(configs: Sequence[str | Path]) -> dict[str, Any]:
    """The ``model`` section of one or more ``spiliformer`` configs as LightningCLI merges them (later
    files win), without building anything."""
    import pytorch_lightning as pl

    from spikecore.train.cli import SpikingCLI, trainer_defaults

    from .module import SpiLiFormerClassifier

    class _ParseOnly(SpikingCLI):
        def _set_seed(self) -> None:
            pass

        def instantiate_classes(self) -> None:
            pass

        def after_instantiate_classes(self) -> None:
            pass

    args = [a for c in configs for a in ("--config", str(c))]
    with warnings.catch_warnings():  # "args given while sys.argv has arguments": intended here
        warnings.filterwarnings("ignore", message=".*args parameter is intended.*")
        cli = _ParseOnly(
            SpiLiFormerClassifier,
            pl.LightningDataModule,
            subclass_mode_data=True,
            trainer_defaults=trainer_defaults(),
            args=args,
            run=False,
            auto_configure_optimizers=False,
        )
    model = cli.config["model"]
    return model.as_dict() if hasattr(model, "as_dict") else dict(vars(model))


def load_authors_checkpoint(
    path: str | Path,
    config: str | Path | Sequence[str | Path] | None = None,
    *,
    variant: str | None = None,
    authors_compat: bool = True,
    **hparams: Any,
):
    """A :class:`~spiliformer.SpiLiFormerClassifier` holding the weights of an authors' checkpoint.

    Args:
        path: the authors' ``.pth`` (read safely: no code from it runs).
        config: the ``spiliformer`` config(s) of the experiment (``configs/cifar10_4_384.yaml``, ...): the
            model is built from its ``model`` section (classes from the checkpoint's head). Without one,
            the architecture is read from the weights with the variant's published heads, T and image
            size.
        variant: ``cifar10`` / ``cifar100`` / ``cifar10dvs`` / ``ncaltech101`` / ``imagenet``; None
            recognises it from the weights (CIFAR-100 by its 100 classes).
        authors_compat: build the model with ``authors_compat=True`` (the authors' computation, which
            their weights were trained with; see :mod:`spiliformer.model`).
        hparams: further hyper-parameters over the config's or the inferred ones (e.g. ``T=1``).

    Returns the module in eval mode; ``module.net`` is the :class:`~spiliformer.SpiLiFormer`.
    """
    from .module import SpiLiFormerClassifier

    state = authors_state_dict(path)
    detected = authors_variant(state)
    if variant is None:
        variant = detected
    elif variant not in VARIANTS:
        raise CheckpointError(f"unknown variant {variant!r}; choose one of {', '.join(VARIANTS)}")
    elif variant != detected and {variant, detected} != {"cifar10", "cifar100"}:
        # (only the CIFAR-10 and CIFAR-100 files build the same parameters)
        raise CheckpointError(f"{path} holds the authors' {detected} model, not {variant}")
    if config is None:
        hp = inferred_hparams(state, variant)
    else:
        configs = [config] if isinstance(config, str | Path) else list(config)
        hp = config_model_hparams(configs)
        hp["num_classes"] = int(state["head.weight"].shape[0])
        _check_config_matches(hp, variant, path, configs)
    hp.update(hparams)
    hp["authors_compat"] = authors_compat
    hp["init_weights"] = None
    hp["lateral_inhibition"] = True
    try:
        module = SpiLiFormerClassifier(**hp)
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"cannot build the model for {path}: {err}") from err
    converted = convert_state_dict(state, module.net, path)
    module.net.load_state_dict(converted, strict=True)
    module.converted_from = {"file": str(path), "code": "authors", "variant": variant}
    return module.eval()


def _check_config_matches(hp: dict, variant: str, path, configs) -> None:
    """The decoder order is invisible in the weights: refuse a config whose decoders are built otherwise
    than the variant's file builds them (other differences show as keys or shapes)."""
    expected = VARIANTS[variant]["options"].get("decoder_bn_first", False)
    if bool(hp.get("decoder_bn_first")) != expected:
        order = "BN -> Linear -> LIF" if expected else "Linear -> BN -> LIF"
        raise CheckpointError(
            f"{path} is the authors' {variant} model, whose decoders are {order}, but "
            f"{', '.join(map(str, configs))} sets decoder_bn_first {bool(hp.get('decoder_bn_first'))}: "
            "use that experiment's config, or --variant if the variant was recognised wrongly"
        )
    if hp.get("arch") != VARIANTS[variant]["arch"]:
        raise CheckpointError(
            f"{path} is the authors' {variant} model ({VARIANTS[variant]['arch']}), but the config builds "
            f"{hp.get('arch')}"
        )


def save_lightning_checkpoint(module, out: str | Path) -> Path:
    """Write ``module`` as a checkpoint that ``spiliformer validate / test / predict --ckpt_path`` and
    ``--model.init_weights`` accept: its state dict, its hyper-parameters (which rebuild the model) and
    the Lightning version; written to a temporary file first, then renamed."""
    import pytorch_lightning as pl

    out = Path(out).expanduser()
    parent = out.parent if str(out.parent) else Path(".")
    if out.is_dir():
        raise CheckpointError(f"output {out} is a folder; give the checkpoint's file name")
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise CheckpointError(f"cannot create the output folder {parent}: {err}") from err
    ckpt = {
        "epoch": 0,
        "global_step": 0,
        "pytorch-lightning_version": pl.__version__,
        "state_dict": {k: v.detach().cpu() for k, v in module.state_dict().items()},
        "hyper_parameters": dict(module.hparams),
        "converted_from": dict(getattr(module, "converted_from", {})),
    }
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", dir=parent)
    except OSError as err:
        raise CheckpointError(f"cannot write into {parent}: {err}") from err
    os.close(fd)
    try:
        torch.save(ckpt, tmp)
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


def convert_command(args: Sequence[str]) -> dict[str, Any]:
    """``spiliformer convert --from authors CKPT.pth OUT.ckpt [--config YAML ...]``."""
    parser = argparse.ArgumentParser(
        prog="spiliformer convert",
        description="Convert a checkpoint of the authors' released SpiLiFormer code into a checkpoint that "
        "`spiliformer validate / test / predict --ckpt_path` accepts. The file is read safely (tensors "
        "only, no code runs).",
    )
    parser.add_argument("--from", dest="source_kind", required=True, choices=["authors"], help="whose code")
    parser.add_argument("checkpoint", help="the authors' checkpoint (.pth)")
    parser.add_argument("out", help="the Lightning checkpoint to write (.ckpt)")
    parser.add_argument(
        "--config",
        action="append",
        default=None,
        help="the experiment's config(s) (e.g. configs/imagenet_10_768_224.yaml); without: the architecture "
        "is read from the weights",
    )
    parser.add_argument(
        "--variant", choices=sorted(VARIANTS), default=None, help="override the recognised variant"
    )
    parser.add_argument(
        "--T", type=int, default=None, help="time steps (the authors' ImageNet models: 1 or 4)"
    )
    parser.add_argument(
        "--no-authors-compat",
        dest="authors_compat",
        action="store_false",
        help="build the paper-faithful model (authors_compat false) instead of reproducing the authors' code",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    opts = parser.parse_args(list(args))
    out = Path(opts.out)
    if out.exists() and not opts.overwrite:
        raise CheckpointError(f"{out} exists; pass --overwrite to replace it")
    extra = {} if opts.T is None else {"T": opts.T}
    module = load_authors_checkpoint(
        opts.checkpoint, opts.config, variant=opts.variant, authors_compat=opts.authors_compat, **extra
    )
    variant = module.converted_from["variant"]
    save_lightning_checkpoint(module, out)
    n = sum(p.numel() for p in module.net.parameters())
    print(
        f"wrote {out}: the authors' {variant} model ({n:,} parameters, authors_compat "
        f"{str(opts.authors_compat).lower()}); run it with "
        f"`spiliformer test --config <the experiment's yaml> --ckpt_path {out}`"
    )
    return {"out": str(out), "variant": variant, "parameters": n, "authors_compat": opts.authors_compat}
