"""``SpiLiFormer``: a QKFormer backbone with lateral-inhibition attention and the two-pass feedback step.

    logits1, Z = backbone(x)                      pass 1: whole network over all T steps
    fb = FeedbackGenerator(Z)                     one map per FB-LiDiff block of the last stage
    reset every neuron
    logits2 = head(last_stage(S_in, fb))          pass 2: the last stage only, on the same input S_in
                                                  (the tokens entering its first block), fb[t] at step t
    evaluation uses logits2

The backbone is a ``spikecore.models`` QKFormer whose last stage has FB-LiDiff attention (and no other
stage has); :func:`lateral_inhibition_off` turns a SpiLiFormer into the plain QKFormer with the same
weights (FF-LiDiff -> QKTA, FB-LiDiff -> SSA, no feedback, one pass).

``authors_compat=True`` reproduces two behaviours of the authors' released code that differ from the
paper (the default keeps the paper's computation):

(a) the output LIF of every FB-LiDiff attention runs over the flattened ``T*B`` axis as if it were time
    (the membrane is carried from sample to sample of the batch, so outputs depend on the batch's
    composition and order): :class:`TimeBatchLIF`;
(b) the decoders of the CIFAR-10, CIFAR10-DVS and N-Caltech101 code end with a reshape that reinterprets
    each step's ``[N, C]`` spikes as ``[C, N]``, so feedback is not aligned with the tokens it modulates.
    Those are the decoders built ``Linear -> [BN] -> LIF`` and chained backward; the CIFAR-100 decoder
    (BN first) and the ImageNet one (forward chain) have no such reshape, so (b) is applied only when
    ``decoder_order == "backward"`` and not ``decoder_bn_first``.
"""

import copy

import torch
from torch import nn

import spikecore
from spikecore import LIF
from spikecore.attention import FBLiDiffAttention, FFLiDiffAttention, SpikingSelfAttention, TokenQKAttention

from .attention import KVDifferenceAttention
from .feedback import FeedbackGenerator


class SpiLiFormer(nn.Module):
    """Two-pass SpiLiFormer around a spikecore QKFormer (see the module docstring).

    Args:
        backbone: a QKFormer whose last-stage blocks (and only those) have FB-LiDiff attention.
        aug: the feedback generator's factor (1.0; 2.0 for CIFAR-100).
        decoder_order: ``"backward"`` (CIFAR / DVS code) or ``"forward"`` (ImageNet code) decoder chain.
        decoder_bn: BatchNorm in the feedback decoders (False in the CIFAR10-DVS code).
        decoder_bn_first: decoders ``BN -> Linear -> LIF`` (the CIFAR-100 code) instead of
            ``Linear -> BN -> LIF``.
        authors_compat: reproduce the authors' code where it differs from the paper (module docstring).
    """

    def __init__(
        self,
        backbone: nn.Module,
        aug: float = 1.0,
        decoder_order: str = "backward",
        decoder_bn: bool = True,
        decoder_bn_first: bool = False,
        authors_compat: bool = False,
    ):
        super().__init__()
        last = backbone.block_stage[-1]
        fb_blocks = [i for i, b in enumerate(backbone.blocks) if b.accepts_feedback]
        stage_blocks = [i for i, s in enumerate(backbone.block_stage) if s == last]
        if fb_blocks != stage_blocks:
            raise ValueError(
                f"SpiLiFormer needs FB-LiDiff attention in every block of the last stage {stage_blocks} "
                f"and nowhere else; the backbone has it in blocks {fb_blocks}"
            )
        self.backbone = backbone
        self.feedback_blocks = fb_blocks
        self.authors_compat = authors_compat
        self.generator = FeedbackGenerator(
            backbone.num_features,
            len(fb_blocks),
            aug,
            decoder_order,
            decoder_bn,
            backbone.neuron,
            decoder_bn_first=decoder_bn_first,
            authors_reshape=authors_compat and decoder_order == "backward" and not decoder_bn_first,
            stateful=backbone.stateful,
        )
        if authors_compat:
            for i in fb_blocks:
                attn = backbone.blocks[i].attn
                attn.proj_lif = TimeBatchLIF.like(attn.proj_lif)

    def no_weight_decay(self) -> set[str]:
        """Parameters kept out of weight decay (timm's hook): the prompts, as in the reference code (where
        they are 1-D and timm's rule leaves them out)."""
        return {"generator.prompts"}

    @property
    def T(self) -> int:
        return self.backbone.T

    @property
    def num_classes(self) -> int:
        return self.backbone.num_classes

    def forward_passes(self, x: torch.Tensor, return_features: bool = False):
        """``(logits1, logits2)`` of the two passes (and ``(Z1, Z2)``, the last stage's outputs, if asked).

        ``x``: ``[B, C, H, W]`` images (repeated over T) or ``[T, B, C, H, W]`` frames.
        """
        bb = self.backbone
        first = self.feedback_blocks[0]
        spikecore.reset(self)  # a new sample: no state from the previous batch
        stage_in = bb.forward_blocks(bb.forward_stem(bb.to_sequence(x)), stop=first)
        z1 = bb.forward_blocks(stage_in, start=first)
        feedback = self.generator(z1)
        spikecore.reset(self)  # pass 2 starts from rest; nothing is detached between the passes
        extras = {i: {"feedback": f} for i, f in zip(self.feedback_blocks, feedback, strict=True)}
        z2 = bb.forward_blocks(stage_in, extras, start=first)
        logits = (bb.forward_head(z1), bb.forward_head(z2))
        return (logits, (z1, z2)) if return_features else logits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Inference: the second pass's logits."""
        return self.forward_passes(x)[1]


class TimeBatchLIF(LIF):
    """The authors' FB-LiDiff output neuron: a LIF run over ``[T, B, ...]`` flattened to ``T*B`` steps of
    one sample (step ``t*B + b``), so each sample's membrane starts where the previous sample's ended.
    Same options and state-dict entries as :class:`spikecore.LIF`."""

    @classmethod
    def like(cls, lif: LIF) -> "TimeBatchLIF":
        if lif.w is not None:
            raise ValueError("authors_compat takes a LIF with a fixed tau")
        return cls(neuron=lif.neuron, stateful=lif.stateful, store_v_seq=lif.store_v_seq)

    def forward(self, x: torch.Tensor, v_init: torch.Tensor | None = None) -> torch.Tensor:
        T, B = x.shape[:2]
        return super().forward(x.reshape(T * B, 1, *x.shape[2:]), v_init).reshape(x.shape)


def _plain(attn: nn.Module) -> nn.Module:
    """The attention without lateral inhibition, holding ``attn``'s weights (and its neuron)."""
    if isinstance(attn, KVDifferenceAttention):
        raise ValueError("the DVS K^T V difference (kv_diff) has no plain-SSA form with the same weights")
    neuron = dict(neuron=attn.neuron, attn_v_threshold=attn.attn_v_threshold, stateful=attn.stateful)
    if isinstance(attn, FBLiDiffAttention):
        plain = SpikingSelfAttention(attn.dim, attn.num_heads, scale=attn.scale, order="kv_first", **neuron)
    elif isinstance(attn, FFLiDiffAttention):
        plain = TokenQKAttention(attn.dim, attn.num_heads, **neuron)
    else:
        return attn
    plain.load_state_dict(attn.state_dict())
    return plain.to(next(attn.parameters()).device).train(attn.training)


def lateral_inhibition_off(model: SpiLiFormer) -> nn.Module:
    """A copy of ``model``'s backbone as the plain QKFormer (QKTA / SSA, no feedback, one pass), same
    weights: the baseline the analysis compares against."""
    base = copy.deepcopy(model.backbone)
    for block in base.blocks:
        block.attn = _plain(block.attn)
    return base
