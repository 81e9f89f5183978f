"""Brain data: NSD and Algonauts 2023 readers, and the synthetic subject on pycortex's S1."""

from .algonauts import AlgonautsSubject, load_algonauts, read_mapping
from .errors import BrainDataError, BrainDataWarning
from .labels import NSD_LABELS, read_ctab
from .nsd import (
    ExpDesign,
    NSDResponses,
    average_repeats,
    load_expdesign,
    load_nsd_betas,
    noise_ceiling,
    nsd_image_ids,
    read_session_betas,
    roi_masks,
    session_trials,
    volume_at,
    zscore,
)

__all__ = [
    "NSD_LABELS",
    "AlgonautsSubject",
    "BrainDataError",
    "BrainDataWarning",
    "ExpDesign",
    "NSDResponses",
    "average_repeats",
    "load_algonauts",
    "load_expdesign",
    "load_nsd_betas",
    "noise_ceiling",
    "nsd_image_ids",
    "read_ctab",
    "read_mapping",
    "read_session_betas",
    "roi_masks",
    "session_trials",
    "volume_at",
    "zscore",
]
