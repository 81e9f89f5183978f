"""``TDFormer``: a spiking backbone run as N segments with top-down feedback between them.

    H_1 = F(CM(S_bu^1, none)),  S_td^n = PM(H_n),  H_n = F(CM(S_bu^n, S_td^(n-1))),  O_n = head(H_n)

T steps are split into ``segments`` chunks of T' = T / N steps, run one after the other through the whole
backbone with the neuron state carried from one segment to the next (the backbone is built with stateful
neurons; ``carry_state=False`` resets it between segments instead, an ablation). The backbone follows
``spikecore.models``' interface: ``forward_stem``/``forward_features(x, extras)``/``forward_head``,
``num_features``, ``block_dims``, ``default_feedback_blocks``. Training weights the segments' losses;
inference uses the last segment's output. Stochastic depth (the backbone's ``drop_path_rate``) drops a
sample's branch in every segment alike: the segments are one sequence.
"""

from collections.abc import Sequence

import torch
from torch import nn

import spikecore
from spikecore.models import hold_drop_path_masks

from .feedback import ControlModule, ProcessingModule


class TDFormer(nn.Module):
    """Top-down feedback around a ``spikecore.models`` backbone.

    Args:
        backbone: a spikecore backbone built with ``stateful=True``.
        segments: N, the number of segments T is split into (T must be divisible by N).
        feedback: ``False`` runs the same segments without any top-down term (the ablation that keeps
            everything else equal); with ``segments=1`` the model is exactly its backbone.
        control: ``"cm1"`` (into K, default), ``"cm2"`` (into V), ``"cm3"`` (into the attention input).
        feedback_blocks: indices of the blocks that receive feedback (default: the backbone's last stage).
        pm_clamp: (b, a) of the PM token mixer's clamp.
        pm_channel_mixer: ``"depthwise"`` (default), ``"dense"`` or ``"none"`` (see ProcessingModule).
        pm_tau, pm_v_threshold, pm_v_reset, pm_detach_reset, pm_surrogate, pm_alpha: the PM's neurons
            (both of its LIFs), explicit rather than taken from the backbone; the defaults are the paper's
            neuron for every backbone (tau 2, V_th 1, hard reset to 0, detached reset, sigmoid with alpha
            4). ``pm_v_reset=None`` is a soft reset. The PM's neurons run on the backbone's kernel
            ``backend`` (where they compute, not how they behave) and carry their membrane from one
            segment's PM call to the next, reset with the model at every new input.
        carry_state: carry neuron state across segments (default) or reset it at each segment.
    """

    def __init__(
        self,
        backbone: nn.Module,
        segments: int = 2,
        feedback: bool = True,
        control: str = "cm1",
        feedback_blocks: Sequence[int] | None = None,
        pm_clamp: tuple[float, float] = (0.0, 2.0),
        pm_channel_mixer: str = "depthwise",
        carry_state: bool = True,
        pm_tau: float = 2.0,
        pm_v_threshold: float = 1.0,
        pm_v_reset: float | None = 0.0,
        pm_detach_reset: bool = True,
        pm_surrogate: str = "sigmoid",
        pm_alpha: float | None = None,
    ):
        super().__init__()
        if segments < 1:
            raise ValueError(f"segments must be >= 1, got {segments}")
        self.backbone = backbone
        self.segments = segments
        self.feedback = feedback
        self.carry_state = carry_state
        dim = backbone.num_features
        blocks = list(backbone.default_feedback_blocks if feedback_blocks is None else feedback_blocks)
        n_blocks = len(backbone.block_dims)
        for i in blocks:
            if not -n_blocks <= i < n_blocks:
                raise ValueError(f"feedback block {i} does not exist: the backbone has {n_blocks} blocks")
            if backbone.block_dims[i] != dim:
                raise ValueError(
                    f"feedback block {i} has width {backbone.block_dims[i]} but the top-down signal has "
                    f"{dim}: choose blocks of the last stage ({list(backbone.default_feedback_blocks)})"
                )
        self.feedback_blocks = [i % n_blocks for i in blocks]
        self.control = nn.ModuleDict({str(i): ControlModule(dim, control) for i in self.feedback_blocks})
        self.pm = ProcessingModule(
            dim,
            *pm_clamp,
            channel_mixer=pm_channel_mixer,
            tau=pm_tau,
            v_threshold=pm_v_threshold,
            v_reset=pm_v_reset,
            detach_reset=pm_detach_reset,
            surrogate=pm_surrogate,
            alpha=pm_alpha,
            backend=getattr(backbone, "neuron", {}).get("backend", "auto"),
            stateful=True,
        )

    @property
    def T(self) -> int:
        return self.backbone.T

    @property
    def num_classes(self) -> int:
        return self.backbone.num_classes

    def forward_segments(self, x: torch.Tensor, return_features: bool = False):
        """Per-segment logits ``[O_1, ..., O_N]`` (and the segments' features H_n if asked)."""
        seq = self.backbone.to_sequence(x)  # images repeated over T; frames as they are
        if seq.shape[0] % self.segments:
            raise ValueError(f"T={seq.shape[0]} steps cannot be split into {self.segments} equal segments")
        spikecore.reset(self)  # a new sample: no state from the previous batch
        logits, feats, s_td = [], [], None
        with hold_drop_path_masks(self.backbone):  # one stochastic-depth draw for the whole sequence
            for n, chunk in enumerate(seq.chunk(self.segments)):
                if n and not self.carry_state:
                    spikecore.reset(self.backbone)
                extras = None
                if s_td is not None:
                    extras = {i: self.control[str(i)](s_td) for i in self.feedback_blocks}
                h = self.backbone.forward_features(chunk, extras)
                logits.append(self.backbone.forward_head(h))
                feats.append(h)
                if self.feedback and n + 1 < self.segments:
                    s_td = self.pm(tokens_last(h))
        return (logits, feats) if return_features else logits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Inference: the last segment's logits."""
        return self.forward_segments(x)[-1]


def tokens_last(h: torch.Tensor) -> torch.Tensor:
    """``[T, B, D, *spatial]`` -> ``[T, B, D, N]``."""
    return h.flatten(3) if h.dim() > 4 else h
