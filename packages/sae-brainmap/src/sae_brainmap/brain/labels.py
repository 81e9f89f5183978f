"""ROI label tables: NSD's ``.ctab`` files (``<id> <name>`` per line) and the same tables built in.

The Algonauts 2023 ``mapping_<class>.npy`` files hold these dicts as pickles; the built-in copies let
the readers resolve names without unpickling anything.
"""

from pathlib import Path

from .errors import BrainDataError, require_file

# NSD's label tables (nsddata/freesurfer/subjXX/label/*.mat.ctab), shared by Algonauts 2023.
NSD_LABELS: dict[str, dict[int, str]] = {
    "prf-visualrois": {1: "V1v", 2: "V1d", 3: "V2v", 4: "V2d", 5: "V3v", 6: "V3d", 7: "hV4"},
    "floc-faces": {1: "OFA", 2: "FFA-1", 3: "FFA-2", 4: "mTL-faces", 5: "aTL-faces"},
    "floc-bodies": {1: "EBA", 2: "FBA-1", 3: "FBA-2", 4: "mTL-bodies"},
    "floc-places": {1: "OPA", 2: "PPA", 3: "RSC"},
    "floc-words": {1: "OWFA", 2: "VWFA-1", 3: "VWFA-2", 4: "mfs-words", 5: "mTL-words"},
    "streams": {1: "early", 2: "midventral", 3: "midlateral", 4: "midparietal", 5: "ventral",
                6: "lateral", 7: "parietal"},
}  # fmt: skip


def read_ctab(path: str | Path) -> dict[int, str]:
    """``{id: name}`` from a FreeSurfer-style colour table (``id name [r g b a]`` per line; id 0 and
    ``Unknown`` are the background and left out)."""
    p = require_file(path, "ROI label table")
    table = {}
    for n, line in enumerate(p.read_text().splitlines(), 1):
        parts = line.split()
        if not parts or parts[0].startswith("#"):
            continue
        try:
            i = int(parts[0])
        except ValueError:
            raise BrainDataError(f"{p}:{n}: expected '<integer id> <name>', got {line!r}") from None
        if len(parts) < 2:
            raise BrainDataError(f"{p}:{n}: label {i} has no name")
        if i > 0 and parts[1] != "Unknown":
            table[i] = parts[1]
    return table


def resolve(names, tables: dict[str, dict[int, str]]) -> dict[str, tuple[str, int]]:
    """``{name: (roi file class, id)}`` for each requested name, or a BrainDataError listing the
    names the tables do contain."""
    where = {name: (cls, i) for cls, table in tables.items() for i, name in table.items()}
    unknown = [n for n in names if n not in where]
    if unknown:
        raise BrainDataError(
            f"unknown ROI name(s) {', '.join(map(repr, unknown))}; available: {', '.join(sorted(where))}"
        )
    return {n: where[n] for n in names}
