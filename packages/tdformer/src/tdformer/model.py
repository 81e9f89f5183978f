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

from collections.abc import Mapping, Sequence

import torch
from torch import nn

import spikecore
from spikecore import BACKBONE_NEURON, NeuronConfig
from spikecore.models import hold_drop_path_masks
from spikecore.neuron.config import UNSET, neuron_from

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
        pm_neuron: the PM's neuron (both of its LIFs), a :class:`spikecore.NeuronConfig`, explicit rather
            than taken from the backbone; default :data:`spikecore.BACKBONE_NEURON`, the paper's neuron for
            every backbone (tau 2, V_th 1, hard reset to 0, detached reset, sigmoid with alpha 4). Its
            ``backend`` "auto" (the default) means the backbone's kernel backend (where the PM computes,
            not how it behaves). The PM's neurons carry their membrane from one segment's PM call to the
            next, reset with the model at every new input.
        pm_tau, pm_v_threshold, pm_v_reset, pm_detach_reset, pm_surrogate, pm_alpha: the older spelling of
            ``pm_neuron``'s fields (``pm_v_reset=None``: soft reset), still accepted instead of it (not
            with it: a ``TypeError``).
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
        pm_tau: float = UNSET,
        pm_v_threshold: float = UNSET,
        pm_v_reset: float | None = UNSET,
        pm_detach_reset: bool = UNSET,
        pm_surrogate: str = UNSET,
        pm_alpha: float | None = UNSET,
        pm_neuron: NeuronConfig | None = None,
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
        loose = dict(
            tau=pm_tau,
            v_threshold=pm_v_threshold,
            v_reset=pm_v_reset,
            detach_reset=pm_detach_reset,
            surrogate=pm_surrogate,
            alpha=pm_alpha,
        )
        given = sorted(f"pm_{k}=" for k, v in loose.items() if v is not UNSET)
        if pm_neuron is not None and given:
            raise TypeError(
                f"TDFormer() got pm_neuron= and {', '.join(given)}: give the PM's neuron one way, inside "
                "pm_neuron=NeuronConfig(...) or as the pm_* keywords alone"
            )
        pm = neuron_from(pm_neuron, loose, BACKBONE_NEURON, "TDFormer()")
        if pm.backend == "auto":
            pm = pm.replace(backend=_backend_of(backbone))
        self.pm = ProcessingModule(dim, *pm_clamp, channel_mixer=pm_channel_mixer, neuron=pm, stateful=True)

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


def _backend_of(backbone: nn.Module) -> str:
    """The backbone's kernel backend (a spikecore backbone's ``neuron``; "auto" for anything else)."""
    neuron = getattr(backbone, "neuron", None)
    if isinstance(neuron, NeuronConfig):
        return neuron.backend
    return neuron.get("backend", "auto") if isinstance(neuron, Mapping) else "auto"


def tokens_last(h: torch.Tensor) -> torch.Tensor:
    """``[T, B, D, *spatial]`` -> ``[T, B, D, N]``."""
    return h.flatten(3) if h.dim() > 4 else h
