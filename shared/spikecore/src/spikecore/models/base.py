"""The interface every spiking backbone in :mod:`spikecore.models` follows."""

import torch
from torch import nn

from ..neuron.config import BACKBONE_NEURON, UNSET, NeuronConfig, neuron_from
from .layers import make_lif

__all__ = ["EXTRA_KEYS", "SpikingBackbone"]

EXTRA_KEYS = ("q_extra", "k_extra", "v_extra", "x_extra", "feedback")


def _pair(size: int | tuple[int, int]) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


class SpikingBackbone(nn.Module):
    """Base class of the spiking vision backbones (Spikformer, SDT v1, QKFormer).

    Constructor arguments common to every model: ``num_classes``, ``T`` (time steps for a static image),
    ``in_chans``, ``img_size`` (int or (H, W); sets ``block_tokens``), ``drop_path_rate`` (stochastic depth
    per sample, the same at every time step; linear over the blocks, 0 by default), ``neuron`` and
    ``stateful`` (False). ``neuron`` (a :class:`spikecore.NeuronConfig`; default
    :data:`spikecore.BACKBONE_NEURON`: tau 2, V_th 1, hard reset to 0, detached reset, sigmoid surrogate with
    alpha 4, backend "auto") is every LIF of the model, in every attention module too, except that the
    attention maps' neurons fire at V_th 0.5 (the modules' ``attn_v_threshold``). The older keyword options
    ``tau``, ``detach_reset``, ``surrogate``, ``alpha`` and ``backend`` still set those fields over the
    default (not together with ``neuron``: a ``TypeError``). With ``stateful=True`` the membranes carry over
    between calls (e.g. TDFormer segments) until ``spikecore.reset(model)``.

    Data flow (``forward(x) == forward_head(forward_features(x_seq))``)::

        x [B, C, H, W] (repeated over self.T steps: direct coding) or x_seq [T, B, C, H, W] (T from input)
        forward_stem(x_seq)            -> [T, B, D0, H0, W0]   spatial; tokens N0 = H0 * W0
        forward_blocks(x, extras)      -> [T, B, D, N]         stage transitions applied between blocks
        forward_features(x_seq, extras) = forward_blocks(forward_stem(x_seq), extras)
        forward_head(features)         -> logits [B, num_classes]

    Blocks. ``self.blocks`` is an ``nn.ModuleList`` of all transformer blocks in execution order. Block
    ``i`` belongs to stage ``self.block_stage[i]``; before the first block of stage ``s > 0`` the
    features are reshaped to their grid and go through ``self.downsample[s - 1]`` (a patch embedding,
    ``[T, B, D, H, W] -> [T, B, D', H', W']``); single-stage models have an empty ``downsample``. Each
    block is called as ``block(x, *, q_extra=None, k_extra=None, v_extra=None, x_extra=None)`` on tokens
    ``x`` ``[T, B, D_i, N_i]``: ``q/k/v_extra`` (``[T, B, D_i, N_i]``) are added to that projection of
    its attention module before the BN; ``x_extra`` (shaped like ``x``) is added to the attention
    module's input but not to the residual. A block raises ``ValueError`` for an extra its attention
    does not have (e.g. ``v_extra`` for Q-K attention); ``feedback`` goes to attention modules whose
    ``forward`` takes one (FB-LiDiff). ``forward_features(x_seq, extras)`` passes ``extras[i]`` (a dict
    with keys among :data:`EXTRA_KEYS`) to block ``i``. ``forward_blocks(x, start=i, stop=j)`` runs a
    slice of the blocks (e.g. SpiLiFormer's second pass over the last stage only).

    Attributes: ``num_features`` (final D), ``block_dims`` (D of each block), ``block_tokens`` (N of each
    block at ``img_size``), ``default_feedback_blocks`` (the blocks of the last stage, D == num_features),
    ``T``, ``num_classes``, ``img_size``, ``in_chans``, ``neuron`` (the model's NeuronConfig), ``stateful``.

    Subclasses build ``blocks``, ``block_stage``, ``downsample``, ``block_dims``, ``block_tokens`` and
    ``head``, implement :meth:`forward_stem`, and override :meth:`forward_head` if their head differs
    (mean over tokens then over T, then ``self.head``).
    """

    def __init__(
        self,
        *,
        num_classes: int,
        T: int,
        in_chans: int,
        img_size: int | tuple[int, int],
        neuron: NeuronConfig | None = None,
        tau: float = UNSET,
        detach_reset: bool = UNSET,
        surrogate: str = UNSET,
        alpha: float | None = UNSET,
        backend: str = UNSET,
        stateful: bool = False,
    ):
        super().__init__()
        if T < 1:
            raise ValueError(f"T must be positive, got {T}")
        self.num_classes = num_classes
        self.T = T
        self.in_chans = in_chans
        self.img_size = _pair(img_size)
        loose = dict(tau=tau, detach_reset=detach_reset, surrogate=surrogate, alpha=alpha, backend=backend)
        self.neuron = neuron_from(neuron, loose, BACKBONE_NEURON, f"{type(self).__name__}()")
        self.stateful = stateful
        self.blocks = nn.ModuleList()
        self.block_stage: list[int] = []
        self.downsample = nn.ModuleList()
        self.block_dims: list[int] = []
        self.block_tokens: list[int] = []

    def make_lif(self, v_threshold: float | None = None) -> nn.Module:
        """A LIF with this model's neuron (V_th ``v_threshold`` when given) and state."""
        return make_lif(self.neuron, v_threshold, stateful=self.stateful)

    @property
    def num_features(self) -> int:
        return self.block_dims[-1]

    @property
    def default_feedback_blocks(self) -> list[int]:
        return [i for i, d in enumerate(self.block_dims) if d == self.num_features]

    # -- forward pieces ---------------------------------------------------------------------------------
    def to_sequence(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, C, H, W]`` -> ``[T, B, C, H, W]`` (the image at every step); a sequence stays as it is."""
        if x.dim() == 4:
            return x.unsqueeze(0).repeat(self.T, 1, 1, 1, 1)
        if x.dim() == 5:
            return x
        raise ValueError(f"expected [B, C, H, W] or [T, B, C, H, W] input, got shape {tuple(x.shape)}")

    def forward_stem(self, x_seq: torch.Tensor) -> torch.Tensor:
        """``[T, B, C, H, W]`` -> the spatial features ``[T, B, D0, H0, W0]`` entering block 0."""
        raise NotImplementedError

    def _check_extras(self, extras: dict[int, dict[str, torch.Tensor]]) -> None:
        for i, block_extras in extras.items():
            if not isinstance(i, int) or not 0 <= i < len(self.blocks):
                raise ValueError(f"extras key {i!r} is not a block index in [0, {len(self.blocks)})")
            unknown = sorted(set(block_extras) - set(EXTRA_KEYS))
            if unknown:
                raise ValueError(f"unknown extra(s) {unknown} for block {i}; valid: {', '.join(EXTRA_KEYS)}")

    def forward_blocks(
        self,
        x: torch.Tensor,
        extras: dict[int, dict[str, torch.Tensor]] | None = None,
        *,
        start: int = 0,
        stop: int | None = None,
    ) -> torch.Tensor:
        """Run blocks ``start .. stop - 1`` (with the stage transitions); returns ``[T, B, D, N]``.

        ``x`` is the input of block ``start``: the stem output for ``start=0``. The result is the input of
        block ``stop`` (so it includes the transition into ``stop``'s stage); ``stop=None`` runs to the
        end and returns the final features. A slice that crosses a stage transition needs ``x`` spatial
        (``[T, B, D, H, W]``), since the patch embedding needs the grid.
        """
        n = len(self.blocks)
        stop = n if stop is None else stop
        if not 0 <= start <= stop <= n:
            raise ValueError(f"need 0 <= start <= stop <= {n} blocks, got start={start}, stop={stop}")
        extras = extras or {}
        self._check_extras(extras)
        grid = x.shape[3:]
        x = x.flatten(3)
        stage = self.block_stage[start] if start < n else self.block_stage[-1]
        for i in range(start, n):
            while stage < self.block_stage[i]:  # patch embedding into the next stage
                if len(grid) != 2:
                    raise ValueError("a stage transition needs spatial input [T, B, D, H, W]")
                x = self.downsample[stage](x.reshape(*x.shape[:3], *grid))
                grid = x.shape[3:]
                x = x.flatten(3)
                stage += 1
            if i == stop:  # x is now the input of block `stop`
                break
            x = self.blocks[i](x, **extras.get(i, {}))
        return x

    def forward_features(
        self, x_seq: torch.Tensor, extras: dict[int, dict[str, torch.Tensor]] | None = None
    ) -> torch.Tensor:
        """Stem and all blocks on ``[T, B, C, H, W]``: the final token features ``[T, B, D, N]``."""
        return self.forward_blocks(self.forward_stem(x_seq), extras)

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        """``[T, B, D, N]`` -> logits ``[B, num_classes]``: mean over tokens, then over T, then Linear."""
        return self.head(features.mean(dim=-1).mean(dim=0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(self.to_sequence(x)))

    # -- helpers for subclasses --------------------------------------------------------------------------
    @staticmethod
    def drop_path_rates(rate: float, n: int) -> list[float]:
        """Stochastic-depth rates rising linearly from 0 to ``rate`` over ``n`` blocks (timm's rule)."""
        return torch.linspace(0, rate, n).tolist()

    def init_weights(self) -> None:
        """Reference-code init: trunc-normal(0.02) Linear weights and zero biases; BN weight 1, bias 0."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.modules.batchnorm._BatchNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
