"""scripts/build_release.py: wheels that install from wheels alone (no path of the builder's machine in their
metadata, spikecore required by name and version), each with its LICENSE and py.typed, and importable with
their command-line entry points from an install that holds nothing but those wheels."""

import email
import os
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT / "scripts"))
import build_release  # noqa: E402

DISTS = {
    "spikecore": "spikecore",
    "tdformer": "tdformer",
    "spiliformer": "spiliformer",
    "sae_brainmap": "sae-brainmap",
}


@pytest.fixture(scope="module")
def wheels(tmp_path_factory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("dist")
    build_release.main(["--out", str(out)])
    found = {p.name.split("-")[0]: p for p in out.glob("*.whl")}
    assert set(found) == set(DISTS), sorted(out.iterdir())
    assert len(list(out.glob("*.tar.gz"))) == len(DISTS)  # and the sdists they were built from
    return found


def _metadata(wheel: Path) -> email.message.Message:
    with zipfile.ZipFile(wheel) as z:
        name = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        return email.message_from_bytes(z.read(name))


def test_packages_require_spikecore_by_name_and_version(wheels):
    version = build_release.version_of(build_release.SPIKECORE)
    for module, wheel in wheels.items():
        requires = [Requirement(r) for r in _metadata(wheel).get_all("Requires-Dist") or []]
        assert all(r.url is None for r in requires), f"{wheel.name} names a URL: {requires}"
        if module == "spikecore":
            continue
        (spikecore,) = [r for r in requires if r.name == "spikecore"]
        assert spikecore.specifier.contains(version) and str(spikecore.specifier) == f"=={version}"
        assert "train" in spikecore.extras


def test_wheels_carry_license_and_type_marker(wheels):
    license_text = (ROOT / "LICENSE").read_text()
    for module, wheel in wheels.items():
        with zipfile.ZipFile(wheel) as z:
            names = z.namelist()
            (license_file,) = [n for n in names if n.endswith("licenses/LICENSE")]
            assert z.read(license_file).decode() == license_text
            assert f"{module}/py.typed" in names
        assert _metadata(wheel)["Version"] == build_release.version_of(
            "shared/spikecore" if module == "spikecore" else f"packages/{DISTS[module]}"
        )


def test_packages_register_their_models_by_entry_point(wheels):
    """tdformer's and spiliformer's wheels declare their spikecore.models entry point (spikecore's one
    registry finds their models through it, never importing the packages by name)."""
    for module in ("tdformer", "spiliformer"):
        with zipfile.ZipFile(wheels[module]) as z:
            name = next(n for n in z.namelist() if n.endswith(".dist-info/entry_points.txt"))
            text = z.read(name).decode()
        assert f"[spikecore.models]\n{module} = {module}.registry" in text, text


def test_the_wheels_alone_install_and_run(wheels, tmp_path):
    """Installed from the wheels into an empty folder and imported without the workspace's editable installs
    (python -S: no .pth files): every module comes from that folder, versions are read from its metadata, the
    packaged configs are there, and each CLI answers --help."""
    site = tmp_path / "site"
    for wheel in wheels.values():
        with zipfile.ZipFile(wheel) as z:
            z.extractall(site)
    third_party = sysconfig.get_paths()["purelib"]  # torch, Lightning, ... (not the workspace members)
    code = f"""
import sys
sys.path[:0] = [{str(site)!r}, {third_party!r}]
import importlib, importlib.resources
for module in {sorted(DISTS)!r}:
    m = importlib.import_module(module)
    assert m.__file__.startswith({str(site)!r}), m.__file__
    print(module, m.__version__)
for package in ("tdformer", "spiliformer", "sae_brainmap"):
    assert importlib.resources.files(package).joinpath("configs", "demo.yaml").is_file(), package
from spikecore.train.cli import packaged_config
assert packaged_config("tdformer", "demo").startswith({str(site)!r})  # --config demo finds the packaged one
from spikecore.models import list_models  # the packages' models, found by their entry points
assert {{"tdformer_sdt_2_512", "spiliformer_4_384"}} <= set(list_models()), list_models()
"""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    run = subprocess.run([sys.executable, "-S", "-c", code], capture_output=True, text=True, env=env)
    assert run.returncode == 0, run.stderr
    assert sorted(line.split()[0] for line in run.stdout.splitlines()) == sorted(DISTS)
    for cli in ("tdformer", "spiliformer", "sae_brainmap"):
        help_code = (
            f"import sys; sys.path[:0] = [{str(site)!r}, {third_party!r}]; sys.argv = ['x', '--help']\n"
        )
        help_code += f"from {cli}.cli import main; main()"
        run = subprocess.run([sys.executable, "-S", "-c", help_code], capture_output=True, text=True, env=env)
        assert run.returncode == 0 and "usage" in run.stdout.lower(), run.stderr[-2000:]
