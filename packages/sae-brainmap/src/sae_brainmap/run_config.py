"""The configuration of ``sae-brainmap run``: dataclasses, one section per stage, read by jsonargparse.

jsonargparse reads the YAML (several ``--config``, dotted overrides such as ``--sae.k 16``,
``--print_config``) and checks every key and type: a key that is not a field of its section (a typo) or a
value of the wrong type fails with one :class:`RunConfigError` naming it. What types cannot say is
checked here, with one RunConfigError each: every value that cannot work (an unknown SAE kind, ``k``
above ``n_latents``, a layer the backbone does not have, a count or batch size below 1, an unknown ROI
name, fewer images than the analyses need), when the config is read: before any image goes through the
ViT.
"""

import dataclasses
import math
import re
import typing
from argparse import ArgumentError
from dataclasses import dataclass, field
from pathlib import Path

from spikecore.errors import ConfigError

from .backbone import DEFAULT_BACKBONE
from .brain.nsd import NSD_IMAGE_SETS
from .brain.s1 import S1_ROIS

SURFACE_VIEWS = ("lateral", "medial", "ventral")  # the fsaverage maps' default panels
NILEARN_VIEWS = ("lateral", "medial", "dorsal", "ventral", "anterior", "posterior")


MIN_IMAGES_EACH = 3  # a correlation over images (dictionary, RSA, encoding R^2) needs at least 3 of them


class RunConfigError(ConfigError):
    """A ``sae-brainmap run`` config that cannot be used (unknown key, wrong type, missing or impossible
    value). A :class:`spikecore.errors.ConfigError`, so a ``ValueError``."""


@dataclass
class ImagesConfig:
    # embedded | folder | nsd (path = nsd_stimuli.hdf5, images from the design) | algonauts (the training
    # images of brain.algonauts.subject_dir, in response-row order; no path)
    source: str = "embedded"
    path: str | None = None
    n_images: int = 96  # embedded only
    seed: int = 0
    batch_size: int = 16


@dataclass
class BackboneConfig:
    # timm: a timm ViT (residual stream after each block) | spiking: a spiking transformer (each block's
    # output averaged over the T steps: spike rates), a spikecore model by name or a class by class_path
    kind: str = "timm"
    name: str = DEFAULT_BACKBONE  # timm model | spikecore.models model (kind spiking without class_path)
    checkpoint: str | None = None  # None: RANDOM weights (a warning says so)
    # kind spiking: the model class (module.Class, e.g. tdformer.TDFormerClassifier), imported at run time
    # and built from the (Lightning) checkpoint's saved hyper-parameters; None: spikecore's `name`
    class_path: str | None = None
    init_args: dict | None = None  # builder arguments (timm / spikecore create_model, or class_path's)
    img_size: int | None = None  # None: the model's own (224)
    mean: list[float] | None = None  # normalisation; None: timm's for the model / the checkpoint's data
    std: list[float] | None = None  # module's (spiking), else ImageNet's
    layers: list[int] | None = None  # None: all blocks
    # random init only (no checkpoint): the weights are drawn from this seed, so that the maps stage can
    # rebuild the same network to recompute a few images' patch tokens
    seed: int = 0


@dataclass
class SAESection:
    # {layer: path} of trained SAEs, or a folder holding layer_XX.safetensors; None: train small ones here
    checkpoints: dict[int, str] | str | None = None
    kind: str = "topk"
    n_latents: int = 1536
    k: int = 32
    steps: int = 100
    batch_size: int = 1024
    lr: float = 1.0e-3
    seed: int = 0


@dataclass
class SyntheticConfig:
    rois: list[str] = field(default_factory=lambda: list(S1_ROIS))
    n_repeats: int = 3
    pool: int = 6
    ncsnr_range: list[float] = field(default_factory=lambda: [0.2, 1.0])
    seed: int = 0


@dataclass
class NSDConfig:
    betas: list[str] = field(default_factory=list)  # betas_sessionXX.nii.gz, in session order
    expdesign: str | None = None  # nsd_expdesign.mat
    subject: int = 1
    roi_files: dict[str, str] = field(default_factory=dict)  # ROI class -> .nii.gz
    label_tables: dict[str, str] | None = None  # ROI class -> .ctab (NSD's classes have built-in tables)
    rois: list[str] = field(default_factory=list)
    ncsnr: str | None = None  # ncsnr.nii.gz (noise ceiling); None: no ceiling
    zscore_by: str = "run"
    # which of the subject's images: all (those in the listed sessions) | unique (the subject's own, the
    # 1,000 shared ones left out: the authors') | shared (only the 1,000 images every subject saw)
    images: str = "all"


@dataclass
class AlgonautsConfig:
    subject_dir: str | None = None  # Algonauts 2023's subjXX folder (training_split/, roi_masks/)
    rois: list[str] = field(default_factory=list)  # ROI names of NSD's tables: V1v, FFA-1, PPA, ...
    roi_classes: list[str] = field(default_factory=list)  # every ROI of these classes: prf-visualrois, ...
    vertices: str = "rois"  # rois: only vertices in the ROIs (as brain.kind nsd) | all: the challenge space
    max_images: int | None = None  # the first N training images and response rows; None: all


@dataclass
class BrainConfig:
    kind: str = "synthetic"  # synthetic | nsd | algonauts
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    nsd: NSDConfig = field(default_factory=NSDConfig)
    algonauts: AlgonautsConfig = field(default_factory=AlgonautsConfig)


@dataclass
class DictionaryConfig:
    centered: bool = True
    one_to_one: bool = False
    candidates: int = 16


@dataclass
class AnalysisConfig:
    rsa_permutations: int = 1000
    # RSA on a seeded random subset of voxels (the [V, V] matrices grow as V^2); null: all voxels (the
    # authors'; memory about 40 V^2 bytes, 9 GB at 15,000 voxels)
    rsa_max_voxels: int | None = 1000
    test_fraction: float = 0.2  # held-out images of the ridge encoding baseline
    seed: int = 0
    selectivity_latents: int = 3  # per ROI: the top latents by mean r (table, numbers and figure rows)
    selectivity_images: int = 5  # per latent: its most activating images (table and figure panels)
    # per ROI and per layer, that layer's top latents by mean r over the ROI (the authors rank 100 per
    # layer); 0: off (numbers.json, selectivity_per_layer.csv, a table in the report)
    selectivity_per_layer: int = 0


@dataclass
class MapsConfig:
    enabled: bool = True  # the cortical maps: pycortex flatmaps, or fsaverage maps for brain.kind algonauts
    images: list[int] = field(
        default_factory=lambda: [0, 1]
    )  # stimuli whose dictionary activations are drawn
    subject: str | None = "S1"  # pycortex subject of the volume (S1 for the synthetic subject)
    xfm: str = "fullhead"
    views: list[str] = field(default_factory=lambda: list(SURFACE_VIEWS))  # fsaverage maps' panels
    # per ROI a PNG of its top latents' top images with their patch-activation maps (needs no pycortex)
    selectivity_figures: bool = True


@dataclass
class RunConfig:
    out: str = "runs/sae-brainmap-run"
    images: ImagesConfig = field(default_factory=ImagesConfig)
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    sae: SAESection = field(default_factory=SAESection)
    brain: BrainConfig = field(default_factory=BrainConfig)
    dictionary: DictionaryConfig = field(default_factory=DictionaryConfig)
    analysis: AnalysisConfig = field(default_factory=AnalysisConfig)
    maps: MapsConfig = field(default_factory=MapsConfig)


def _config_error(err: BaseException) -> RunConfigError:
    """jsonargparse's message for a key or value it refuses, as one line."""
    text = " ".join(str(err).split())
    unknown = re.search(r"Group '([^']+)' does not accept option '([^']+)'", text) or re.search(
        r"Option '()([^']+)' is not accepted", text
    )
    if unknown:
        parts = [p for p in ".".join(unknown.groups()).split(".") if p]
        depth = 0  # the longest prefix that is a section; the next part is the unknown key
        while depth < len(parts) - 1 and _section_class(".".join(parts[: depth + 1])) is not None:
            depth += 1
        section, key = ".".join(parts[:depth]), parts[depth]
        allowed = ", ".join(f.name for f in dataclasses.fields(_section_class(section)))
        return RunConfigError(
            f"unknown key {key!r} in section {section or '<top>'!r} of the run config; allowed: {allowed}"
        )
    keyed = re.match(r'Parser key "([^"]+)": (.*)', text)
    if keyed:
        return RunConfigError(f"{keyed.group(1)}: {keyed.group(2)}")
    return RunConfigError(text)


def _section_class(section: str):
    cls = RunConfig
    for part in [p for p in section.split(".") if p]:
        hints = typing.get_type_hints(cls)
        if part not in hints or not dataclasses.is_dataclass(hints[part]):
            return None
        cls = hints[part]
    return cls


def run_parser():
    """The jsonargparse parser of ``sae-brainmap run``: ``--config`` (several, later wins; a shipped config
    by name: ``--config demo_run``), every field of :class:`RunConfig` as a dotted option (``--sae.k 16``),
    ``--print_config``, ``--rebuild``. Types are checked by jsonargparse; what types cannot say is checked
    by :func:`check_config`."""
    from jsonargparse import ActionConfigFile, ActionYesNo, ArgumentParser

    parser = ArgumentParser(
        prog="sae-brainmap run",
        description="Run the SAE-BrainMap pipeline end to end (activations, SAEs, brain data, voxel "
        "dictionary, analyses, maps, report); stages whose outputs match their inputs are skipped.",
        exit_on_error=False,
        allow_abbrev=False,
    )
    parser.add_argument("--config", action=ActionConfigFile, help="a run config (YAML), e.g. demo_run")
    parser.add_class_arguments(RunConfig, nested_key=None, fail_untyped=True)
    parser.add_argument(
        "--rebuild",
        action=ActionYesNo,
        default=False,
        help="run every stage again, even those whose outputs match their inputs (e.g. after replacing an "
        "input file in a way its size and time do not show)",
    )
    return parser


def _resolve_configs(args: list[str]) -> list[str]:
    """``--config NAME`` of a config shipped with the package, as a path; a missing file is one error."""
    from spikecore.train.cli import packaged_config

    out, take_next = [], False
    for a in args:
        value = None
        if take_next:
            value, take_next = a, False
        elif a == "--config":
            take_next = True
        elif a.startswith("--config="):
            value = a.split("=", 1)[1]
        if value is not None and not value.lstrip().startswith(("{", "[")):
            resolved = packaged_config("sae_brainmap", value)
            if not Path(resolved).expanduser().is_file():
                raise RunConfigError(f"run config {value} does not exist")
            a = resolved if a == value else f"--config={resolved}"
        out.append(a)
    return out


def parse_run_args(args: list[str]) -> tuple[RunConfig, bool]:
    """``sae-brainmap run``'s arguments: the checked :class:`RunConfig` and ``--rebuild``."""
    parser = run_parser()
    try:
        ns = parser.parse_args(_resolve_configs(list(args)))
        ns.pop("config", None)
        rebuild = bool(ns.pop("rebuild", False))
        ns = parser.instantiate(ns)
    except (ArgumentError, ValueError, TypeError) as err:
        if isinstance(err, RunConfigError):
            raise
        raise _config_error(err) from None
    config = RunConfig(**{f.name: ns[f.name] for f in dataclasses.fields(RunConfig)})
    _validate(config)
    return config, rebuild


def load_run_config(path: str | Path, out: str | None = None) -> RunConfig:
    """Read and check a run config (YAML; or a shipped one by name). ``out`` overrides its ``out``."""
    args = ["--config", str(path)] + (["--out", str(out)] if out is not None else [])
    return parse_run_args(args)[0]


def _validate(c: RunConfig) -> None:
    if c.images.source not in ("embedded", "folder", "nsd", "algonauts"):
        raise RunConfigError(
            f"images.source must be embedded, folder, nsd or algonauts, got {c.images.source!r}"
        )
    if c.images.source in ("folder", "nsd") and not c.images.path:
        what = "a folder of images" if c.images.source == "folder" else "nsd_stimuli.hdf5"
        raise RunConfigError(f"images.source {c.images.source} needs images.path ({what})")
    if c.brain.kind not in ("synthetic", "nsd", "algonauts"):
        raise RunConfigError(f"brain.kind must be synthetic, nsd or algonauts, got {c.brain.kind!r}")
    if (c.brain.kind == "algonauts") != (c.images.source == "algonauts"):
        raise RunConfigError(
            "brain.kind algonauts and images.source algonauts go together (the responses are rows of the "
            f"subject's own training images); got brain.kind {c.brain.kind}, images.source {c.images.source}"
        )
    if c.brain.kind == "algonauts":
        _validate_algonauts(c.brain.algonauts)
    if c.brain.kind == "nsd":
        n = c.brain.nsd
        missing = [k for k in ("betas", "expdesign", "roi_files", "rois") if not getattr(n, k)]
        if missing:
            raise RunConfigError(f"brain.kind nsd needs brain.nsd.{', brain.nsd.'.join(missing)}")
        if c.images.source != "nsd":
            raise RunConfigError("brain.kind nsd needs images.source nsd (the subject's own stimuli)")
        if n.images not in NSD_IMAGE_SETS:
            raise RunConfigError(f"brain.nsd.images must be {', '.join(NSD_IMAGE_SETS)}; got {n.images!r}")
    if c.brain.kind == "synthetic" and c.images.source == "nsd":
        raise RunConfigError("images.source nsd is only used with brain.kind nsd")
    if not 0 < c.analysis.test_fraction < 1:
        raise RunConfigError(f"analysis.test_fraction must be in (0, 1), got {c.analysis.test_fraction}")
    for key in ("selectivity_latents", "selectivity_images"):
        if getattr(c.analysis, key) < 1:
            raise RunConfigError(f"analysis.{key} must be at least 1, got {getattr(c.analysis, key)}")
    if len(c.maps.images) > 0 and min(c.maps.images) < 0:
        raise RunConfigError("maps.images are image indices (>= 0)")
    bad_views = [v for v in c.maps.views if v not in NILEARN_VIEWS]
    if bad_views or not c.maps.views:
        raise RunConfigError(
            f"maps.views must be a non-empty list of {', '.join(NILEARN_VIEWS)}; got {c.maps.views}"
        )
    _validate_counts(c)
    _validate_sae(c.sae)
    _validate_backbone(c.backbone)
    if c.brain.kind == "synthetic":
        _validate_synthetic(c.brain.synthetic)
    if c.images.source == "embedded":
        check_image_count(c.images.n_images, c, "images.n_images")


def _at_least(value: int | float, low: int, key: str) -> None:
    if value < low:
        raise RunConfigError(f"{key} must be at least {low}, got {value}")


def _validate_counts(c: RunConfig) -> None:
    _at_least(c.images.n_images, 1, "images.n_images")
    _at_least(c.images.batch_size, 1, "images.batch_size")
    if c.analysis.rsa_max_voxels is not None:  # None: all voxels
        _at_least(c.analysis.rsa_max_voxels, 3, "analysis.rsa_max_voxels")  # RSA compares voxel pairs
    _at_least(c.analysis.selectivity_per_layer, 0, "analysis.selectivity_per_layer")
    _at_least(c.analysis.rsa_permutations, 0, "analysis.rsa_permutations")
    _at_least(c.dictionary.candidates, 1, "dictionary.candidates")


def _validate_sae(s: SAESection) -> None:
    from .sae import KINDS

    if s.kind not in KINDS:
        raise RunConfigError(f"sae.kind must be one of {', '.join(KINDS)}, got {s.kind!r}")
    _at_least(s.n_latents, 1, "sae.n_latents")
    if s.kind in ("topk", "batchtopk") and not 1 <= s.k <= s.n_latents:
        raise RunConfigError(
            f"sae.k must be in 1..sae.n_latents ({s.n_latents}) for sae.kind {s.kind}, got {s.k}"
        )
    _at_least(s.steps, 1, "sae.steps")
    _at_least(s.batch_size, 1, "sae.batch_size")
    if not (math.isfinite(s.lr) and s.lr > 0):
        raise RunConfigError(f"sae.lr must be a positive number, got {s.lr}")


def backbone_depth(b: BackboneConfig) -> int:
    """The number of blocks of ``backbone.name`` at ``backbone.img_size``, from a model built on the meta
    device (no weights allocated, nothing read): an unknown name or a size that does not fit is one
    RunConfigError."""
    import timm
    import torch

    kwargs = {**(b.init_args or {}), **({"img_size": b.img_size} if b.img_size is not None else {})}
    try:
        with torch.device("meta"):
            vit = timm.create_model(b.name, pretrained=False, num_classes=0, **kwargs)
    except Exception as err:
        size = f" at img_size {b.img_size}" if b.img_size is not None else ""
        text = " ".join(str(err).split())[:200]
        raise RunConfigError(f"backbone.name {b.name!r}{size}: timm cannot build it ({text})") from None
    if not all(hasattr(vit, a) for a in ("blocks", "patch_embed", "forward_intermediates")):
        raise RunConfigError(
            f"backbone.name {b.name!r} is not a vision transformer (no blocks / patch_embed / "
            "forward_intermediates)"
        )
    grid = getattr(vit.patch_embed, "grid_size", (1, 1))
    if b.img_size is not None and min(grid) < 1:
        patch = getattr(vit.patch_embed, "patch_size", "?")
        raise RunConfigError(f"backbone.img_size {b.img_size} is smaller than {b.name}'s patch size {patch}")
    return len(vit.blocks)


def check_spiking_backbone(b: BackboneConfig) -> None:
    """What can be checked of a ``kind: spiking`` backbone without building it or reading its weights: the
    class path imports (or the name is a spikecore model) and the checkpoint is a local file. Its layers
    are checked when it is built, before any image."""
    from spikecore.models import list_models
    from spikecore.serialization import CheckpointError, local_file

    from .spiking import BackboneClassError, import_class

    if b.checkpoint is not None:
        try:
            local_file(b.checkpoint, "backbone.checkpoint")
        except CheckpointError as err:
            raise RunConfigError(str(err)) from None
    if b.class_path is not None:
        try:
            import_class(b.class_path)
        except BackboneClassError as err:
            raise RunConfigError(str(err)) from None
    elif b.name not in list_models():
        raise RunConfigError(
            f"backbone.name {b.name!r} is not a spikecore model (kind spiking without class_path; "
            f"registered: {', '.join(list_models())})"
        )


def _validate_backbone(b: BackboneConfig) -> None:
    from .backbone import KINDS

    if b.kind not in KINDS:
        raise RunConfigError(f"backbone.kind must be one of {', '.join(KINDS)}, got {b.kind!r}")
    if b.kind == "timm" and b.class_path is not None:
        raise RunConfigError(
            "backbone.class_path names a spiking model class: it needs backbone.kind spiking"
        )
    for key in ("mean", "std"):
        value = getattr(b, key)
        if value is not None and (len(value) != 3 or (key == "std" and min(value) <= 0)):
            raise RunConfigError(f"backbone.{key} must be 3 numbers (per RGB channel; std > 0), got {value}")
    if b.kind == "spiking":
        check_spiking_backbone(b)
    depth = backbone_depth(b) if b.kind == "timm" else None
    if b.layers is None:
        return
    if not b.layers:
        raise RunConfigError("backbone.layers is empty: list block indices, or null for all")
    if depth is None:  # spiking: negative indices are refused here, the rest when the model is built
        depth = max(max(b.layers) + 1, 0)
    bad = [lay for lay in b.layers if not 0 <= lay < depth]
    if bad:
        raise RunConfigError(
            f"backbone.layers {bad} out of range: {b.name} has {depth} blocks, layers 0..{depth - 1}"
        )


def _validate_synthetic(s: SyntheticConfig) -> None:
    unknown = [r for r in s.rois if r not in S1_ROIS]
    if unknown or not s.rois:
        raise RunConfigError(
            f"brain.synthetic.rois: unknown ROI name(s) {', '.join(map(repr, unknown)) or '(none given)'}; "
            f"the synthetic subject has {', '.join(S1_ROIS)}"
        )
    _at_least(s.n_repeats, 1, "brain.synthetic.n_repeats")
    _at_least(s.pool, 1, "brain.synthetic.pool")
    lo_hi = s.ncsnr_range
    if len(lo_hi) != 2 or not 0 < lo_hi[0] <= lo_hi[1]:
        raise RunConfigError(
            f"brain.synthetic.ncsnr_range must be [low, high] with 0 < low <= high, got {lo_hi}"
        )


def min_images(test_fraction: float) -> int:
    """The fewest images the analyses can use: the encoding baseline holds out max(3, test_fraction * N)
    images and fits on the rest, and every correlation over images (dictionary, RSA, R^2) needs 3."""
    n = MIN_IMAGES_EACH
    while n - max(MIN_IMAGES_EACH, round(test_fraction * n)) < MIN_IMAGES_EACH:
        n += 1
    return n


def check_image_count(n: int, c: RunConfig, where: str) -> None:
    """A RunConfigError if ``n`` images (from ``where``) are too few for the analyses."""
    need = min_images(c.analysis.test_fraction)
    if n < need:
        n_test = max(MIN_IMAGES_EACH, round(c.analysis.test_fraction * n))
        raise RunConfigError(
            f"{where}: {n} images are too few; the analyses need at least {need} (the ridge encoding "
            f"baseline holds out {n_test} at analysis.test_fraction {c.analysis.test_fraction} and fits on "
            f"the rest, and every correlation over images needs {MIN_IMAGES_EACH})"
        )


def _check_nsd_rois(n: NSDConfig) -> None:
    """The ROI names against the label tables (the given ``.ctab`` files or NSD's built-in tables)."""
    from .brain import BrainDataError
    from .brain.labels import NSD_LABELS, read_ctab, resolve

    tables = {}
    for cls in n.roi_files:
        given = (n.label_tables or {}).get(cls)
        if given is None and cls not in NSD_LABELS:
            raise RunConfigError(
                f"brain.nsd.roi_files: no label table for ROI class {cls!r} (NSD's built-in ones: "
                f"{', '.join(NSD_LABELS)}); add brain.nsd.label_tables.{cls}"
            )
        try:
            tables[cls] = NSD_LABELS[cls] if given is None else read_ctab(Path(given).expanduser())
        except BrainDataError as err:
            raise RunConfigError(f"brain.nsd.label_tables.{cls}: {err}") from None
    try:
        resolve(n.rois, tables)
    except BrainDataError as err:
        raise RunConfigError(f"brain.nsd.rois: {err}") from None


def algonauts_rois(a: AlgonautsConfig) -> list[str]:
    """The run's ROI names: ``rois`` then every ROI of ``roi_classes``, each once, in that order."""
    from .brain.algonauts import roi_class_names

    return list(dict.fromkeys([*a.rois, *roi_class_names(a.roi_classes)]))


def _validate_algonauts(a: AlgonautsConfig) -> None:
    """What can be checked without the data (the files are checked by :func:`check_inputs`)."""
    from .brain import BrainDataError
    from .brain.algonauts import roi_classes_of

    if a.subject_dir is None:
        raise RunConfigError(
            "brain.kind algonauts needs brain.algonauts.subject_dir (Algonauts 2023's subjXX folder)"
        )
    if not a.rois and not a.roi_classes:
        raise RunConfigError(
            "brain.kind algonauts needs ROIs: brain.algonauts.rois (names such as V1v, FFA-1) and/or "
            "brain.algonauts.roi_classes (such as prf-visualrois, floc-faces)"
        )
    try:
        roi_classes_of(algonauts_rois(a))
    except BrainDataError as err:
        raise RunConfigError(f"brain.algonauts: {err}") from None
    if a.vertices not in ("rois", "all"):
        raise RunConfigError(f"brain.algonauts.vertices must be rois or all, got {a.vertices!r}")
    if a.max_images is not None and a.max_images < 1:
        raise RunConfigError(f"brain.algonauts.max_images must be at least 1 (or null), got {a.max_images}")


def check_output_folder(c: RunConfig) -> Path:
    """``out`` created if needed and proven writable (a probe file), before any work: a path that is a
    file or a read-only folder is one RunConfigError rather than a traceback after the work is done."""
    from spikecore.errors import OutputFolderError, writable_dir

    try:
        return writable_dir(c.out, "output folder (out)")
    except OutputFolderError as err:
        raise RunConfigError(str(err)) from None


def check_inputs(c: RunConfig) -> None:
    """Before any stage runs: the config's values (again, for a RunConfig built in Python), the NSD ROI
    names against their label tables, and for brain.kind algonauts that the data files exist, so that a
    wrong value or path fails at once with one message rather than after the activations stage's hours."""
    _validate(c)
    if c.brain.kind == "nsd":
        _check_nsd_rois(c.brain.nsd)
    if c.brain.kind != "algonauts":
        return
    from .brain.algonauts import HEMIS, fmri_path, roi_classes_of, roi_mask_path

    root = Path(c.brain.algonauts.subject_dir).expanduser()
    if not root.is_dir():
        raise RunConfigError(f"brain.algonauts.subject_dir: no such folder: {root}")
    needed = [(fmri_path(root, h), "the responses") for h in HEMIS]
    needed.append((root / "training_split" / "training_images", "the training images"))
    for cls in roi_classes_of(algonauts_rois(c.brain.algonauts)):
        needed += [(roi_mask_path(root, h, cls), f"the {cls} ROI mask") for h in HEMIS]
    for path, what in needed:
        if not path.exists():
            raise RunConfigError(f"brain.algonauts.subject_dir {root} lacks {what}: {path} does not exist")
