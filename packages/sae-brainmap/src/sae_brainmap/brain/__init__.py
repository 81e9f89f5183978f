"""Brain data: NSD and Algonauts 2023 readers, and the synthetic subject on pycortex's S1."""

from .algonauts import AlgonautsSubject, load_algonauts, read_mapping
from .errors import BrainDataError
from .labels import NSD_LABELS, read_ctab
from .nsd import (
    ExpDesign,
    NSDResponses,
    average_repeats,
    load_expdesign,
    load_nsd_betas,
    noise_ceiling,
    read_session_betas,
    roi_masks,
    zscore,
)

__all__ = [
    "NSD_LABELS",
    "AlgonautsSubject",
    "BrainDataError",
    "ExpDesign",
    "NSDResponses",
    "average_repeats",
    "load_algonauts",
    "load_expdesign",
    "load_nsd_betas",
    "noise_ceiling",
    "read_ctab",
    "read_mapping",
    "read_session_betas",
    "roi_masks",
    "zscore",
]
