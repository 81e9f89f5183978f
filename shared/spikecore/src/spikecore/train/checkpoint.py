"""Lightning checkpoints read safely, by the CLI and by the trainer alike.

Every route by which a checkpoint reaches Lightning or torch in the packages (``--ckpt_path`` on the command
line or in any config file, ``--ckpt_path last``, ``init_weights``, ``analyze``) ends in
:func:`load_checkpoint`, built on :func:`spikecore.serialization.safe_torch_load`: local files only,
``weights_only=True``, zip checksums verified, and no NaN or infinity in the weights or the optimiser state.
:class:`SafeCheckpointIO` puts the same loader inside the trainer, so Lightning's own restore uses it too.
"""

from pathlib import Path
from typing import Any

import torch
from lightning_fabric.plugins import CheckpointIO

from ..serialization import CheckpointError, check_finite, safe_torch_load

__all__ = ["CheckpointError", "SafeCheckpointIO", "load_checkpoint", "load_state_dict_file", "load_weights"]


def load_checkpoint(
    path: str | Path, map_location: str | torch.device = "cpu", lightning: bool = False
) -> dict[str, Any]:
    """A checkpoint written by ``fit``, read without running code from it.

    ``lightning=True`` also requires what Lightning needs to restore a run (its version and loop state): a
    plain state dict given as ``--ckpt_path`` is refused with a message pointing at ``init_weights``.
    """
    ckpt = safe_torch_load(path, "checkpoint", map_location)
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        hint = (
            " It looks like a plain state dict: start from it with --model.init_weights instead."
            if isinstance(ckpt, dict) and ckpt and all(isinstance(v, torch.Tensor) for v in ckpt.values())
            else ""
        )
        raise CheckpointError(f"{path} is not a Lightning checkpoint (no 'state_dict' entry).{hint}")
    if lightning and "pytorch-lightning_version" not in ckpt:
        raise CheckpointError(
            f"{path} has weights but none of the training state Lightning restores (no "
            "'pytorch-lightning_version'): start from its weights with --model.init_weights instead."
        )
    # The weights and the optimiser's moments; callbacks keep legitimate infinities (an unset best score).
    check_finite(
        {"state_dict": ckpt["state_dict"], "optimizer_states": ckpt.get("optimizer_states", [])}, path
    )
    return ckpt


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """The weights in ``path``: a Lightning checkpoint's ``state_dict`` or a plain state dict."""
    obj = safe_torch_load(path, "weights file")
    state = obj.get("state_dict", obj) if isinstance(obj, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path} holds neither a Lightning checkpoint nor a state dict of tensors")
    check_finite(state, path, "weights file")
    return state


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


class SafeCheckpointIO(CheckpointIO):
    """The trainer's checkpoint I/O with :func:`load_checkpoint` as its reader; saving and removing are
    delegated to the I/O it wraps (Lightning's default, or one the user configured)."""

    def __init__(self, inner: CheckpointIO | None = None):
        from lightning_fabric.plugins import TorchCheckpointIO

        self.inner = inner if inner is not None else TorchCheckpointIO()
        self._preloaded: tuple[str, dict] | None = None

    def preload(self, path: str | Path, checkpoint: dict[str, Any]) -> None:
        """Hand over a checkpoint the CLI already read and checked, so the trainer does not read it twice."""
        self._preloaded = (str(path), checkpoint)

    def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
        self.inner.save_checkpoint(checkpoint, path, storage_options=storage_options)

    def load_checkpoint(self, path, map_location=None, weights_only=None) -> dict[str, Any]:
        if self._preloaded is not None and self._preloaded[0] == str(path) and map_location is None:
            checkpoint, self._preloaded = (
                self._preloaded[1],
                None,
            )  # once: a later restore reads the file again
            return checkpoint
        return load_checkpoint(path, map_location if map_location is not None else "cpu", lightning=True)

    def remove_checkpoint(self, path) -> None:
        self.inner.remove_checkpoint(path)

    def teardown(self) -> None:
        self.inner.teardown()
