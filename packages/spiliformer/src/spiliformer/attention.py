"""The DVS variant's FB-LiDiff: the lateral-inhibition difference inside ``K^T V``.

spikecore's :class:`~spikecore.attention.FBLiDiffAttention` is the CIFAR / ImageNet form (SSA in the
linear order with the feedback added to V). The DVS code projects K and V to 2C and subtracts two
``K^T V`` maps; per head ``h`` (its 2d channels of K and V, interleaved into even and odd channels):

    Y_h = LIF_0.5( Q_h (K_even^T V_even - K_odd^T V_odd) * scale )      (token-major notation)
"""

import torch
from torch import nn

from spikecore.attention import FBLiDiffAttention, split_heads


class KVDifferenceAttention(FBLiDiffAttention):
    """FB-LiDiff with K and V projected to 2C and the difference of the even / odd ``K^T V`` maps.

    ``forward(x, feedback=None)``: as FB-LiDiff, the feedback goes through the same ``v_conv`` as ``x``
    (``V = LIF(BN(W_v X + W_v F))``, now 2C wide). ``k_extra`` / ``v_extra`` are not accepted (they would
    have to be 2C wide); ``q_extra`` is.
    """

    def __init__(self, dim: int, num_heads: int = 8, scale: float = 0.125, **options):
        super().__init__(dim, num_heads, scale=scale, **options)
        for name in ("k", "v"):
            setattr(self, f"{name}_conv", nn.Conv1d(dim, 2 * dim, kernel_size=1, bias=False))
            setattr(self, f"{name}_bn", nn.BatchNorm1d(2 * dim))

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        qh = split_heads(q, self.num_heads)  # [T, B, H, d, N]
        kh, vh = split_heads(k, self.num_heads), split_heads(v, self.num_heads)  # [T, B, H, 2d, N]
        # Channel-major, as spikecore's ssa: Y_h = (V_h K_h^T) Q_h with [d, N] operands.
        kv = vh[..., 0::2, :] @ kh[..., 0::2, :].transpose(-2, -1)
        kv = kv - vh[..., 1::2, :] @ kh[..., 1::2, :].transpose(-2, -1)
        y = (kv @ qh).flatten(2, 3) * self.scale
        return self.attn_lif(y)

    def forward(
        self,
        x: torch.Tensor,
        feedback: torch.Tensor | None = None,
        *,
        q_extra: torch.Tensor | None = None,
        k_extra: torch.Tensor | None = None,
        v_extra: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if k_extra is not None or v_extra is not None:
            raise ValueError(
                "KVDifferenceAttention projects K and V to 2C: k_extra / v_extra are not accepted"
            )
        shape = x.shape
        x = self._tokens(x)
        v_fb = None
        if feedback is not None:
            f = self._tokens(feedback, "feedback")
            v_fb = self.v_conv(f.flatten(0, 1)).reshape(*f.shape[:2], -1, f.shape[-1])
        q = self.project("q", x, None if q_extra is None else self._tokens(q_extra, "q_extra"))
        y = self.attend(q, self.project("k", x), self.project("v", x, v_fb))
        return self.output(y).reshape(shape)


def use_kv_difference(backbone: nn.Module) -> nn.Module:
    """Replace every FB-LiDiff attention of ``backbone`` by the DVS form (fresh weights); returns it."""
    for block in backbone.blocks:
        attn = block.attn
        if type(attn) is FBLiDiffAttention:
            block.attn = KVDifferenceAttention(
                attn.dim,
                attn.num_heads,
                scale=attn.scale,
                neuron=attn.neuron,
                attn_v_threshold=attn.attn_v_threshold,
                stateful=attn.stateful,
            )
    return backbone
