"""``sae-brainmap run``: the whole pipeline, end to end, in resumable stages (see :mod:`.runner`).

One module per stage (:mod:`.activations`, :mod:`.brain`, :mod:`.dictionary`, :mod:`.analysis`,
:mod:`.maps`, :mod:`.report`), what they share in :mod:`.common`, the stage bookkeeping (manifests,
hashes, skipping) in :mod:`.runner`.
"""

from .activations import _activations
from .analysis import _analysis
from .brain import _brain, _nsd_brain
from .common import (
    DISPLAY_PX,
    FSAVERAGE_MAPS,
    LATENT_COUNTS,
    RSA_HEATMAPS,
    SELECTIVITY_MAPS,
    SIMILARITY_INPUTS,
    TRAINING_IMAGES,
    _algonauts_images,
    _nsd_image_ids,
)
from .dictionary import _dictionary
from .maps import _maps, _selectivity_rows
from .report import _report
from .runner import (
    _RUNNERS,
    _STAGE_MODULES,
    STAGES,
    UPSTREAM,
    VERSION,
    Stage,
    _count_images,
    _section,
    _stamp,
    check_run,
    run_pipeline,
)

__all__ = [  # what earlier code imported from the single module pipeline.py
    "DISPLAY_PX",
    "FSAVERAGE_MAPS",
    "LATENT_COUNTS",
    "RSA_HEATMAPS",
    "SELECTIVITY_MAPS",
    "SIMILARITY_INPUTS",
    "STAGES",
    "TRAINING_IMAGES",
    "UPSTREAM",
    "VERSION",
    "_RUNNERS",
    "_STAGE_MODULES",
    "Stage",
    "_activations",
    "_algonauts_images",
    "_analysis",
    "_brain",
    "_count_images",
    "_dictionary",
    "_maps",
    "_nsd_brain",
    "_nsd_image_ids",
    "_report",
    "_section",
    "_selectivity_rows",
    "_stamp",
    "check_run",
    "run_pipeline",
]
