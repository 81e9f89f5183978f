"""spikingjelly 2.0 model-zoo weights -> spikecore backbones, by tensor name (spikingjelly is never imported).

spikingjelly's ``spikingjelly.activation_based.model`` holds the same three families as
:mod:`spikecore.models` under other module names. :func:`convert_spikingjelly_state_dict` renames every
tensor of such a state dict onto the spikecore model and rearranges what is laid out differently:

- **Fused projections.** spikingjelly computes Q, K (and V) with one ``Conv1d(C, k*C)`` + ``BN(k*C)``
  (``qkv_conv_bn`` / ``qk_conv_bn``); spikecore has one ``Conv1d(C, C)`` + ``BN(C)`` per branch. The rows
  are split in order (q, k, v).
- **Conv biases before a BN.** spikingjelly's SDT and QKFormer stem convs have biases that spikecore's
  (like the reference code's) do not. A per-channel constant ``b`` before a BN (or before a max-pool and
  then a BN) only shifts the channel's statistics, so it is folded exactly into the BN: ``running_mean -=
  b`` (in training the batch mean absorbs it, and the running mean keeps the same offset).
- **Conv biases spikecore has and spikingjelly does not** (Spikformer's projection / MLP convs, QKFormer's
  attention projection): zero.
- **1x1 ``Conv2d`` -> ``Conv1d``.** SDT's token convs are 2-D in spikingjelly and 1-D here (same numbers).

Layout settings that are not visible in the weights (:data:`SPIKINGJELLY_LAYOUT`) are applied when
:func:`spikecore.models.create_model` loads such weights: spikingjelly's Spikformer max-pools the SPS
BN output before the LIF (``pool_position="pre"``) and its QKFormer is the ImageNet one
(``stem="imagenet"``). Everything else (widths, depths, heads, classes, ``T``, image size, SDT's
``pooling_stat``, Spikformer's ``pool_stages``) is the caller's to pass, as for any checkpoint; a
mismatch of names or shapes is one :class:`~spikecore.serialization.CheckpointError`.

Command line::

    python -m spikecore.models.convert --input sj_spikformer.pth --output spikformer.safetensors \\
        [--arch spikformer|sdt|qkformer]

The input is read with :func:`spikecore.serialization.safe_torch_load` (``weights_only``: tensors and plain
containers, nothing that runs code); the output is a safetensors file spikecore's ``create_model(name,
checkpoint_path=...)`` and ``torch.hub.load`` read.
"""

import argparse
import re
import sys
from collections.abc import Callable, Mapping
from pathlib import Path

import torch

from ..errors import UserError
from ..serialization import CheckpointError

__all__ = [
    "ARCHS",
    "SPIKINGJELLY_LAYOUT",
    "arch_class",
    "convert_spikingjelly_state_dict",
    "detect_spikingjelly_arch",
    "main",
]

ARCHS = ("spikformer", "sdt", "qkformer")

# Constructor settings spikecore needs to compute what spikingjelly's model computes, that the weights
# cannot show.
SPIKINGJELLY_LAYOUT: dict[str, dict[str, str]] = {
    "spikformer": {"pool_position": "pre"},
    "sdt": {},
    "qkformer": {"stem": "imagenet"},
}

# spikingjelly's module names: a key matching one of these is spikingjelly's (spikecore names differ).
_SIGNATURES: dict[str, re.Pattern] = {
    "spikformer": re.compile(
        r"^patch_embed\.(stages\.\d+|positional_encoding)\.conv_bn\."
        r"|^blocks\.\d+\.(attn\.qkv_conv_bn|mlp\.fc[12]\.[01])\."
    ),
    "sdt": re.compile(
        r"^patch_embed\.(final_stage|stages\.\d+\.[01])\."
        r"|^blocks\.\d+\.mlp\.(fc|bn)[12]\.(weight|bias|running_mean|running_var|num_batches_tracked)$"
    ),
    "qkformer": re.compile(
        r"^patch_embed\d+\.(conv|bn)\d+\.|^stage\d+\.\d+\.(attn\.(qk|qkv|proj)_conv_bn|mlp\.(fc|bn)[12])\."
    ),
}

_Rule = tuple[re.Pattern, str | Callable[[re.Match], str]]


def _rules(*pairs: tuple[str, str | Callable[[re.Match], str]]) -> list[_Rule]:
    return [(re.compile(p), r) for p, r in pairs]


_SPIKFORMER = _rules(
    (r"patch_embed\.stages\.(\d+)\.conv_bn\.block\.0\.(.+)", r"patch_embed.proj.\1.conv.\2"),
    (r"patch_embed\.stages\.(\d+)\.conv_bn\.block\.1\.(.+)", r"patch_embed.proj.\1.bn.\2"),
    (r"patch_embed\.positional_encoding\.conv_bn\.block\.0\.(.+)", r"patch_embed.rpe.conv.\1"),
    (r"patch_embed\.positional_encoding\.conv_bn\.block\.1\.(.+)", r"patch_embed.rpe.bn.\1"),
    (r"blocks\.(\d+)\.attn\.proj_conv_bn\.0\.(.+)", r"blocks.\1.attn.proj_conv.\2"),
    (r"blocks\.(\d+)\.attn\.proj_conv_bn\.1\.(.+)", r"blocks.\1.attn.proj_bn.\2"),
    (r"blocks\.(\d+)\.mlp\.fc([12])\.0\.(.+)", r"blocks.\1.mlp.fc\2_conv.\3"),
    (r"blocks\.(\d+)\.mlp\.fc([12])\.1\.(.+)", r"blocks.\1.mlp.fc\2_bn.\3"),
    (r"head\.(weight|bias)", r"head.\1"),
)
_SDT = _rules(
    (r"patch_embed\.stages\.(\d+)\.0\.(.+)", r"patch_embed.proj.\1.conv.\2"),
    (r"patch_embed\.stages\.(\d+)\.1\.(.+)", r"patch_embed.proj.\1.bn.\2"),
    (r"patch_embed\.final_stage\.0\.(.+)", r"patch_embed.proj_final.conv.\1"),
    (r"patch_embed\.final_stage\.1\.(.+)", r"patch_embed.proj_final.bn.\1"),
    (r"patch_embed\.(rpe_conv|rpe_bn)\.(.+)", r"patch_embed.\1.\2"),
    (r"blocks\.(\d+)\.attn\.([qkv]|proj)_(conv|bn)\.(.+)", r"blocks.\1.attn.\2_\3.\4"),
    (r"blocks\.(\d+)\.mlp\.fc([12])\.(.+)", r"blocks.\1.mlp.fc\2_conv.\3"),
    (r"blocks\.(\d+)\.mlp\.bn([12])\.(.+)", r"blocks.\1.mlp.fc\2_bn.\3"),
    (r"head\.(weight|bias)", r"head.\1"),
)


def _qkformer_embed(stage: str) -> str:
    """spikingjelly's ``patch_embed<s>`` (1-based) -> spikecore's stem or stage transition."""
    s = int(stage)
    return "patch_embed" if s == 1 else f"downsample.{s - 2}"


def _qkformer_rules(offsets: Mapping[int, int]) -> list[_Rule]:
    """``stage<s>.<j>`` is spikecore block ``offsets[s] + j`` (blocks are numbered across stages)."""

    def block(m: re.Match) -> str:
        return f"blocks.{offsets[int(m['stage'])] + int(m['j'])}"

    def embed_conv(m: re.Match) -> str:
        kind = "conv" if m["kind"] == "conv" else "bn"
        return f"{_qkformer_embed(m['s'])}.proj.{int(m['i']) - 1}.{kind}.{m['name']}"

    def shortcut(m: re.Match) -> str:
        return f"{_qkformer_embed(m['s'])}.shortcut.{'conv' if m['layer'] == '0' else 'bn'}.{m['name']}"

    def proj(m: re.Match) -> str:
        return f"{block(m)}.attn.proj_{'conv' if m['layer'] == '0' else 'bn'}.{m['name']}"

    def mlp(m: re.Match) -> str:
        return f"{block(m)}.mlp.fc{m['i']}_{'conv' if m['kind'] == 'fc' else 'bn'}.{m['name']}"

    blk = r"stage(?P<stage>\d+)\.(?P<j>\d+)"
    return _rules(
        (r"patch_embed(?P<s>\d+)\.(?P<kind>conv|bn)(?P<i>\d+)\.(?P<name>.+)", embed_conv),
        (r"patch_embed(?P<s>\d+)\.shortcut\.(?P<layer>[01])\.(?P<name>.+)", shortcut),
        (blk + r"\.attn\.proj_conv_bn\.(?P<layer>[01])\.(?P<name>.+)", proj),
        (blk + r"\.mlp\.(?P<kind>fc|bn)(?P<i>[12])\.(?P<name>.+)", mlp),
        (r"head\.(weight|bias)", r"head.\1"),
    )


def _fused(owner: str, module: str) -> re.Pattern:
    return re.compile(rf"(?P<owner>{owner})\.attn\.{module}\.(?P<layer>[01])\.(?P<name>.+)")


# Fused Q/K(/V) projections: (pattern naming the block, conv (0) or BN (1) and the tensor) -> branches in
# row order.
_FUSED: dict[str, list[tuple[re.Pattern, str]]] = {
    "spikformer": [(_fused(r"blocks\.\d+", "qkv_conv_bn"), "qkv")],
    "sdt": [],
    "qkformer": [
        (_fused(r"stage(?P<stage>\d+)\.(?P<j>\d+)", "qkv_conv_bn"), "qkv"),
        (_fused(r"stage(?P<stage>\d+)\.(?P<j>\d+)", "qk_conv_bn"), "qk"),
    ],
}


# spikecore convs without a bias, each followed by the BN named by the replacement: a spikingjelly bias
# mapped onto one is folded into that BN's running mean.
_BIAS_FREE = re.compile(r"^(?P<base>.+)(?P<sep>[._])conv\.bias$")
_BIAS_FREE_OK = re.compile(r"(^|\.)(proj|fc[12])_conv\.bias$")  # spikecore convs that do have a bias
# spikecore convs with a bias that spikingjelly's model may lack: a zero bias is supplied.
_NEEDS_BIAS = re.compile(r"^blocks\.\d+\.(attn\.proj_conv|mlp\.fc[12]_conv)\.weight$")


def detect_spikingjelly_arch(state_dict: Mapping[str, torch.Tensor]) -> str | None:
    """``"spikformer"``, ``"sdt"`` or ``"qkformer"`` when the keys are spikingjelly's names for that model
    (a ``module.`` prefix of DDP is ignored), ``None`` when none is (e.g. a spikecore state dict)."""
    keys = [k.removeprefix("module.") for k in state_dict]
    hits = {arch: sum(1 for k in keys if sig.search(k)) for arch, sig in _SIGNATURES.items()}
    best = max(hits, key=hits.get)
    return best if hits[best] else None


def arch_class(arch: str) -> type[torch.nn.Module]:
    """The spikecore model class that holds spikingjelly's ``arch``."""
    from .qkformer import QKFormer
    from .sdt import SpikeDrivenTransformer
    from .spikformer import Spikformer

    return {"spikformer": Spikformer, "sdt": SpikeDrivenTransformer, "qkformer": QKFormer}[_check_arch(arch)]


def _check_arch(arch: str) -> str:
    if arch not in ARCHS:
        raise CheckpointError(f"unknown spikingjelly arch {arch!r}; choose one of {', '.join(ARCHS)}")
    return arch


def _show(keys: list[str], n: int = 4) -> str:
    return f"{keys[:n]}{' ...' if len(keys) > n else ''}"


def convert_spikingjelly_state_dict(
    state_dict: Mapping[str, torch.Tensor], arch: str | None = None
) -> dict[str, torch.Tensor]:
    """spikecore's state dict for the spikingjelly 2.0 ``arch`` model whose weights are ``state_dict``.

    ``arch``: ``"spikformer"`` (``spikingjelly...model.spikformer.Spikformer``), ``"sdt"``
    (``spike_driven_transformer.SpikeDrivenTransformer``) or ``"qkformer"`` (``qkformer.QKFormer``);
    ``None`` detects it from the key names. The result loads strictly into the spikecore model of the same
    sizes (built with :data:`SPIKINGJELLY_LAYOUT` to compute the same function). Every tensor is a new
    contiguous copy in its original dtype. A state dict of another model or arch, or with keys the mapping
    does not know, is a :class:`~spikecore.serialization.CheckpointError` naming them.
    """
    if not isinstance(state_dict, Mapping) or not all(
        isinstance(v, torch.Tensor) for v in state_dict.values()
    ):
        raise CheckpointError("expected a state dict: a mapping of names to tensors")
    state = {k.removeprefix("module."): v for k, v in state_dict.items()}
    found = detect_spikingjelly_arch(state)
    if arch is None:
        if found is None:
            raise CheckpointError(
                "not a spikingjelly Spikformer / SDT / QKFormer state dict (none of its module names); "
                f"first keys: {_show(list(state))}"
            )
        arch = found
    _check_arch(arch)
    if found != arch:
        what = f"a spikingjelly {found} state dict" if found else "not a spikingjelly state dict"
        raise CheckpointError(
            f"expected spikingjelly {arch} weights, but this is {what} (keys {_show(list(state))})"
        )

    if arch == "qkformer":
        depths: dict[int, int] = {}
        for k in state:
            m = re.match(r"stage(\d+)\.(\d+)\.", k)
            if m:
                s, j = int(m[1]), int(m[2])
                depths[s] = max(depths.get(s, 0), j + 1)
        offsets, total = {}, 0
        for s in sorted(depths):
            offsets[s] = total
            total += depths[s]
        rules = _qkformer_rules(offsets)
    else:
        offsets = {}
        rules = _SPIKFORMER if arch == "spikformer" else _SDT

    out: dict[str, torch.Tensor] = {}
    unmapped: list[str] = []
    for key, value in state.items():
        fused = next(((m, branches) for p, branches in _FUSED[arch] if (m := p.fullmatch(key))), None)
        if fused is not None:
            m, branches = fused
            owner = m["owner"]
            if arch == "qkformer":
                owner = f"blocks.{offsets[int(m['stage'])] + int(m['j'])}"
            kind = "conv" if m["layer"] == "0" else "bn"
            if value.dim() and value.shape[0] % len(branches):
                raise CheckpointError(f"{key} has {value.shape[0]} rows, not {len(branches)} equal parts")
            for i, branch in enumerate(branches):
                part = value if value.dim() == 0 else value.chunk(len(branches))[i]
                out[f"{owner}.attn.{branch}_{kind}.{m['name']}"] = part
            continue
        for pattern, repl in rules:
            m = pattern.fullmatch(key)
            if m:
                out[m.expand(repl) if isinstance(repl, str) else repl(m)] = value
                break
        else:
            unmapped.append(key)
    if unmapped:
        raise CheckpointError(
            f"{len(unmapped)} key(s) of this spikingjelly {arch} state dict have no spikecore counterpart: "
            f"{_show(unmapped)}"
        )

    # Biases of convs that spikecore builds without one: folded into the next BN.
    for key in [k for k in out if _BIAS_FREE.match(k) and not _BIAS_FREE_OK.search(k)]:
        m = _BIAS_FREE.match(key)
        mean_key = f"{m['base']}{m['sep']}bn.running_mean"
        if mean_key not in out:
            raise CheckpointError(f"cannot fold the conv bias {key}: no BN statistics {mean_key}")
        bias = out.pop(key)
        out[mean_key] = out[mean_key] - bias.to(out[mean_key].dtype)
    # Biases spikecore has and spikingjelly's model does not: zero.
    for key in [k for k in out if _NEEDS_BIAS.match(k)]:
        bias_key = key.removesuffix("weight") + "bias"
        if bias_key not in out:
            out[bias_key] = torch.zeros(out[key].shape[0], dtype=out[key].dtype)
    # 1x1 Conv2d token projections (SDT) -> Conv1d.
    for key, value in out.items():
        if key.startswith("blocks.") and key.endswith("_conv.weight") and value.dim() == 4:
            if value.shape[2:] != (1, 1):
                raise CheckpointError(f"{key}: expected a 1x1 convolution, got shape {tuple(value.shape)}")
            out[key] = value.flatten(2)
    return {k: v.detach().clone().contiguous() for k, v in out.items()}


# -- command line ------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    """Convert spikingjelly 2.0 Spikformer / SDT / QKFormer weights into a spikecore safetensors file."""
    from .weights import read_state_dict, save_safetensors

    ap = argparse.ArgumentParser(prog="python -m spikecore.models.convert", description=main.__doc__)
    ap.add_argument("--input", required=True, help="spikingjelly weights: a state dict saved by torch.save")
    ap.add_argument("--output", required=True, help="the spikecore weights to write (.safetensors)")
    ap.add_argument("--arch", choices=ARCHS, default=None, help="the model (default: from the key names)")
    args = ap.parse_args(argv)
    try:
        state, _ = read_state_dict(args.input, what="spikingjelly weights")
        arch = args.arch or detect_spikingjelly_arch(state)
        converted = convert_spikingjelly_state_dict(state, arch)
        out = save_safetensors(
            converted, args.output, {"spikecore.source": "spikingjelly", "spikecore.arch": str(arch)}
        )
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    layout = ", ".join(f"{k}={v!r}" for k, v in SPIKINGJELLY_LAYOUT[str(arch)].items())
    print(f"wrote {out}: spikingjelly {arch}, {len(converted)} tensors")
    print(
        f"load it with create_model(<a {arch} model>, checkpoint_path={str(Path(out))!r}, <its sizes>)"
        + (f"; spikingjelly's layout ({layout}) is applied automatically" if layout else "")
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
