"""Build release wheels and sdists of spikecore and the three packages, into ``dist/``.

In the repository each package names spikecore by a path (``spikecore[train] @ {root:parent:parent:uri}/
shared/spikecore``, see packages/README.md), which a built wheel records as the builder's absolute
``file://`` URL: such a wheel installs only on the machine that built it. A release build copies each
member to a temporary folder, replaces that path dependency with ``spikecore[...]==<spikecore's version>``
and builds there with ``uv build``, so the wheels install anywhere from an index or a folder of wheels:

    python scripts/build_release.py              # or: make dist
    pip install --find-links dist tdformer       # spikecore comes from dist/ by name and version

The repository itself is not modified.
"""

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SPIKECORE = "shared/spikecore"
PACKAGES = ("packages/tdformer", "packages/spiliformer", "packages/sae-brainmap")
# The path dependency of packages/README.md, with its optional extras.
PATH_DEPENDENCY = re.compile(r'"spikecore(\[[^\]"]*\])? @ \{root:parent:parent:uri\}/shared/spikecore"')
SKIP = shutil.ignore_patterns("__pycache__", "*.pyc", ".pytest_cache", "build", "dist", "*.egg-info")


def version_of(member: str) -> str:
    return tomllib.loads((ROOT / member / "pyproject.toml").read_text())["project"]["version"]


def release_pyproject(text: str, spikecore_version: str) -> str:
    """The package's pyproject.toml with its spikecore path dependency pinned by name and version."""
    released, n = PATH_DEPENDENCY.subn(lambda m: f'"spikecore{m.group(1) or ""}=={spikecore_version}"', text)
    if n != 1:
        raise SystemExit(
            f"error: expected one spikecore path dependency in a package's pyproject.toml, found {n}"
        )
    return released


def find_uv() -> str:
    for candidate in (shutil.which("uv"), ROOT / ".tools" / "bin" / "uv"):
        if candidate and Path(candidate).exists():
            return str(candidate)
    raise SystemExit(
        "error: uv not found; run `make install` (it installs uv into .tools/) or `pip install uv`"
    )


def build(out: Path, uv: str) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    spikecore_version = version_of(SPIKECORE)
    before = set(out.iterdir())
    with tempfile.TemporaryDirectory(prefix="release-") as tmp:
        for member in (SPIKECORE, *PACKAGES):
            staged = Path(tmp) / Path(member).name
            # symlinks=False: LICENSE is a link to the root's; the copy carries the file itself.
            shutil.copytree(ROOT / member, staged, symlinks=False, ignore=SKIP)
            if member != SPIKECORE:
                pyproject = staged / "pyproject.toml"
                pyproject.write_text(release_pyproject(pyproject.read_text(), spikecore_version))
            print(f"building {member}", flush=True)
            subprocess.run([uv, "build", "--quiet", "--out-dir", str(out), str(staged)], check=True)
    return sorted(set(out.iterdir()) - before)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "dist", help="output folder (default: dist/)")
    args = parser.parse_args(argv)
    for path in build(args.out, find_uv()):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
