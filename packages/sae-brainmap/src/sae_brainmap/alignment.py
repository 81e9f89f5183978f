"""SAE latent <-> voxel similarity: for every voxel, the best-matching latents of one layer.

A thin, validated front to :func:`spikecore.topk_similarity`, which streams the ``[latents, voxels]``
similarity matrix chunk by chunk and never holds it whole (12 x 12,288 latents x 40,000 voxels would
be 24 GB in float32).
"""

import torch
from torch import Tensor

from spikecore import topk_similarity


def check_pair(acts: Tensor, responses: Tensor, what: str = "acts") -> None:
    """Raise a ValueError naming the problem when ``acts`` and ``responses`` cannot be compared."""
    for name, t in ((what, acts), ("responses", responses)):
        if not isinstance(t, Tensor) or t.dim() != 2:
            got = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
            raise ValueError(f"{name} must be a 2-D tensor [N images, columns], got {got}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be floating point, got {t.dtype}")
    if acts.shape[0] != responses.shape[0]:
        raise ValueError(
            f"{what} and responses must cover the same images (rows): got {acts.shape[0]} and "
            f"{responses.shape[0]}; average the repeats and align the image order first"
        )
    if acts.shape[0] < 3:
        raise ValueError(f"a correlation over images needs at least 3 images, got {acts.shape[0]}")


def top_matches(
    acts: Tensor, responses: Tensor, k: int = 1, centered: bool = True, *, chunk: int = 2048
) -> tuple[Tensor, Tensor]:
    """For each voxel (column of ``responses`` ``[N, V]``), the ``k`` latents (columns of ``acts``
    ``[N, U]``) with the highest Pearson r (``centered=True``, the default) or plain cosine.

    Returns ``(values [V, k] float32, indices [V, k] int64)``, best first, ties to the smaller latent.
    A constant latent never wins; a constant voxel gets value 0 and index -1.
    """
    check_pair(acts, responses)
    if not 1 <= k <= acts.shape[1]:
        raise ValueError(f"k must be between 1 and the number of latents ({acts.shape[1]}), got {k}")
    if responses.device != acts.device:
        responses = responses.to(acts.device)
    with torch.no_grad():
        return topk_similarity(acts, responses, k=k, centered=centered, chunk=chunk)
