"""Reading checkpoints safely: ``weights_only=True`` always, and one clear message per failure."""

from pathlib import Path
from typing import Any

import torch


class CheckpointError(ValueError):
    """A checkpoint that is missing, unreadable, unsafe or does not fit the model."""


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a Lightning (or plain) checkpoint without running code from it.

    ``torch.load(weights_only=True)`` refuses pickled objects other than tensors and plain containers, so a
    malicious file cannot execute code; a truncated or foreign file gives a :class:`CheckpointError` that
    says what to do.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist (pass the .ckpt file written by `fit`)")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # truncated zip, not a torch file, or objects weights_only refuses
        raise CheckpointError(
            f"cannot read checkpoint {path}: {type(err).__name__}: {str(err).splitlines()[0][:300]}. "
            "It is corrupted, truncated, or holds objects that are not plain tensors (refused for safety); "
            "use a checkpoint written by this package's `fit`."
        ) from err
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise CheckpointError(f"{path} is not a Lightning checkpoint (no 'state_dict' entry)")
    return ckpt


def load_weights(module: torch.nn.Module, ckpt: dict[str, Any], path: str | Path = "checkpoint") -> None:
    """Load ``ckpt['state_dict']`` into ``module`` strictly, naming missing/unexpected keys on failure."""
    try:
        result = module.load_state_dict(ckpt["state_dict"], strict=False)
    except RuntimeError as err:  # a tensor of the wrong shape
        raise CheckpointError(
            f"{path} does not fit this model ({str(err).splitlines()[-1].strip()[:300]}). "
            "Use the config the checkpoint was trained with."
        ) from err
    if result.missing_keys or result.unexpected_keys:
        raise CheckpointError(
            f"{path} does not fit this model: missing {result.missing_keys[:5]}"
            f"{' ...' if len(result.missing_keys) > 5 else ''}, unexpected {result.unexpected_keys[:5]}"
            f"{' ...' if len(result.unexpected_keys) > 5 else ''}. "
            "Use the config the checkpoint was trained with."
        )
