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
"""

import copy

import torch
from torch import nn

import spikecore
from spikecore.attention import FBLiDiffAttention, FFLiDiffAttention, SpikingSelfAttention, TokenQKAttention

from .attention import KVDifferenceAttention
from .feedback import FeedbackGenerator


class SpiLiFormer(nn.Module):
    """Two-pass SpiLiFormer around a spikecore QKFormer (see the module docstring).

    Args:
        backbone: a QKFormer whose last-stage blocks (and only those) have FB-LiDiff attention.
        aug: the feedback generator's factor (1.0; 2.0 for CIFAR-100).
        decoder_order: ``"backward"`` (CIFAR / DVS code) or ``"forward"`` (ImageNet code) decoder chain.
        decoder_bn: BatchNorm in the feedback decoders (False in the DVS code).
    """

    def __init__(
        self,
        backbone: nn.Module,
        aug: float = 1.0,
        decoder_order: str = "backward",
        decoder_bn: bool = True,
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
        self.generator = FeedbackGenerator(
            backbone.num_features, len(fb_blocks), aug, decoder_order, decoder_bn, backbone.neuron
        )

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


def _plain(attn: nn.Module, neuron: dict) -> nn.Module:
    """The attention without lateral inhibition, holding ``attn``'s weights."""
    if isinstance(attn, KVDifferenceAttention):
        raise ValueError("the DVS K^T V difference (kv_diff) has no plain-SSA form with the same weights")
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
        block.attn = _plain(block.attn, base.neuron)
    return base
