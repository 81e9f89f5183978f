"""Saving and loading single SAEs: safetensors (default) or torch, never executing code on load."""

import json
from pathlib import Path

import torch

from spikecore.serialization import CheckpointError, check_finite, first_line, local_file, safe_torch_load

from .sae import SAE, SAEConfig

FORMAT = "sae_brainmap.sae/1"
WHAT = "SAE checkpoint"


class SAECheckpointError(CheckpointError):
    """A missing, corrupted, foreign, non-finite or mismatched SAE checkpoint (a
    :class:`spikecore.serialization.CheckpointError`, so a ``ValueError``)."""


def save_sae(sae: SAE, path: str | Path) -> Path:
    """Write ``sae`` with its config (kind, sizes, layer, backbone, normalisation). ``.safetensors``
    stores the config as metadata; any other suffix writes a ``torch.save`` dict of tensors and strings."""
    path = Path(path)
    state = {k: v.detach().cpu().contiguous() for k, v in sae.state_dict().items()}
    bad = [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:  # a diverged SAE: never written as if it were a result
        raise SAECheckpointError(f"refusing to save {path}: the SAE's {', '.join(bad)} hold NaN or infinity")
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"format": FORMAT, "config": json.dumps(sae.config.to_dict())}
    tmp = path.with_name(path.name + ".tmp")
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(state, str(tmp), metadata=meta)
    else:
        torch.save({**meta, "state_dict": state}, tmp)
    tmp.replace(path)  # atomic: a reader never sees half a file
    return path


def _read(path: Path) -> tuple[dict, dict]:
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            state = {k: f.get_tensor(k) for k in f.keys()}
        return meta, state
    obj = safe_torch_load(path, what=WHAT)  # local file, zip checksums, weights_only
    if not isinstance(obj, dict) or "state_dict" not in obj or not isinstance(obj["state_dict"], dict):
        raise SAECheckpointError(f"{path} is not an SAE checkpoint (no 'state_dict' entry)")
    return obj, obj["state_dict"]


def load_sae(path: str | Path, map_location: str | torch.device = "cpu") -> SAE:
    """Rebuild the SAE saved at ``path``; any problem (missing, a URL, corrupted, unsafe, foreign, NaN or
    infinite weights, a config that does not fit) raises one :class:`SAECheckpointError`."""
    try:
        path = local_file(path, WHAT)
        meta, state = _read(path)
        check_finite(state, path, WHAT)
    except SAECheckpointError:
        raise
    except CheckpointError as err:  # spikecore's checks: same message, this package's type
        raise SAECheckpointError(str(err)) from err
    except Exception as err:  # truncated, or not a safetensors file
        raise SAECheckpointError(
            f"cannot read {WHAT} {path}: {first_line(err)}. "
            "It is corrupted, truncated, or not a file written by sae_brainmap.save_sae."
        ) from err
    if meta.get("format") != FORMAT or "config" not in meta:
        raise SAECheckpointError(
            f"{path} is not an sae_brainmap SAE checkpoint (format {meta.get('format')!r})"
        )
    try:
        config = SAEConfig.from_dict(json.loads(meta["config"]))
        sae = SAE(config)
    except (ValueError, TypeError) as err:
        raise SAECheckpointError(f"{path} holds an invalid SAE config: {err}") from err
    try:
        result = sae.load_state_dict(state, strict=False)
    except RuntimeError as err:  # a tensor whose shape does not match the config
        raise SAECheckpointError(
            f"{path} does not match its own config ({str(err).splitlines()[-1].strip()[:300]})"
        ) from err
    if result.missing_keys or result.unexpected_keys:
        raise SAECheckpointError(
            f"{path} does not match its config: missing {result.missing_keys}, "
            f"unexpected {result.unexpected_keys}"
        )
    return sae.to(map_location)
