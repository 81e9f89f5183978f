"""Every reference in the repository's documentation resolves.

The scanner reads every markdown file, every Python file's docstrings and comments (``tokenize`` and
``ast``, so string constants in code are not taken for references) and the YAML / TOML / shell / Makefile
texts, and collects:

* markdown links ``[text](target)`` and images ``![alt](target)``: the target (a file or folder) must
  exist, relative to the markdown file; ``#anchor`` parts of links into markdown files must name one of
  that file's headings (GitHub's slugs);
* repository paths written out, e.g. ``docs/spikecore-equations.md``, ``shared/spikecore/README.md``,
  ``tests/test_models.py``: a path with a file extension whose first folder is a top-level folder of the
  repository (``docs``, ``packages``, ``shared``, ``benchmarks``, ``scripts``), a package's own ``tests`` /
  ``configs`` / ``src``, or an explicit ``./`` or ``../``. It must exist relative to the file, to the
  package the file belongs to (its nearest folder with a ``pyproject.toml``) or to the repository root; a
  package-relative path in a file that belongs to no package (the root README's layout) may name any
  package's file;
* test files named on their own (``test_*.py``): one of that name must exist somewhere in the repository;
  in ``docs/``, test names (``test_segments_equal_one_run``): a test function, or a test file, of that name
  must (elsewhere ``test_*`` words are too often option names, e.g. ``test_fraction``).

Not references, and not checked: URLs, absolute paths and placeholders (``/path/to/...``, ``~/data``,
``<out>/maps/x.png``, ``layer_XX``, ``{a,b}``, ``*``), run outputs (``runs/``, ``data/``, ``analysis/``,
``maps/``: none is a top-level folder of the repository), other projects' files named without one of the
roots above (the authors' ``cifar10/model.py``), and the generated outputs listed in :data:`GENERATED`.

It also refuses references to material outside the repository that earlier texts used (a ``spec``
folder beside the repository and its numbered sections): the documentation lives in ``docs/``.
"""

import ast
import fnmatch
import io
import os
import re
import tokenize
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]

# Folders never scanned: environments, caches, build outputs and the ignored run outputs.
SKIP_DIRS = {
    ".git",
    ".venv",
    ".tools",
    ".pytest_cache",
    ".ruff_cache",
    "__pycache__",
    "node_modules",
    "build",
    "dist",
    "lightning_logs",
    ".whl",
    ".gl",
}
SKIP_TOP = {"runs", "data", "analysis"}  # ignored at the repository root (.gitignore): outputs, datasets
# Written paths whose first folder is one of these are resolved from the repository root ...
ROOTS = ("docs", "packages", "shared", "benchmarks", "scripts")
# ... and these from the package the referring file belongs to (or the root).
PACKAGE_DIRS = ("tests", "configs", "src")
EXTENSIONS = ("py", "md", "yaml", "yml", "toml", "sh", "cpp", "json", "txt", "cfg", "ini")
# What is scanned: markdown, Python (docstrings and comments only), and the config and build files, whose
# every line is read (YAML configs name each other and the commands that use them).
SCANNED = (".md", ".py", ".yaml", ".yml", ".toml", ".sh", "Makefile")
# Generated outputs that documentation may name before they exist (repository-relative globs).
GENERATED = (
    "benchmarks/results/*-cuda.json",
    "benchmarks/results/logs/*",
)
# Phrases that point outside the repository.
OUTSIDE = "shared" + "/spec"  # the notes the project was started from live outside the repository
FORBIDDEN = (
    re.compile(rf"(?:\.\./)+{OUTSIDE}\b"),
    re.compile(rf"\b{OUTSIDE}/"),
    re.compile(r"\bspec section\b", re.IGNORECASE),
    re.compile(r"\bsection \d+ of the spec\b", re.IGNORECASE),
    re.compile(r"\bthe spec(?:'s)?\b", re.IGNORECASE),
)

_EXT = "|".join(EXTENSIONS)
# A written path: starts at a boundary (not inside a URL, an absolute path or a longer name), made of path
# characters, ends in a known extension, and is not followed by more of a name or a placeholder.
PATH_RE = re.compile(
    r"(?<![\w./~:@$%<>{}*-])((?:\.\.?/)*[A-Za-z0-9_][\w.\-/]*\.(?:" + _EXT + r"))(?![\w/*{}<>|$-])"
)
TEST_NAME_RE = re.compile(r"(?<![\w./~:@$<>{}*-])(test_\w+\.py)(?![\w/*{}<>|$-])")
TEST_FUNC_RE = re.compile(r"(?<![\w./~:@$<>{}*-])(test_\w+)(?![\w./*{}<>|$(-])")
TEST_DEF_RE = re.compile(r"^\s*(?:async\s+)?def\s+(test_\w+)\s*\(", re.MULTILINE)
LINK_RE = re.compile(
    r"!?\[(?:[^\[\]]|\[[^\[\]]*\])*\]\(\s*<?([^()\s<>]+(?:\([^()\s]*\))?)>?(?:\s+\"[^\"]*\")?\s*\)"
)
SCHEME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")
PLACEHOLDER_RE = re.compile(r"\.\.\.|XX|NN|<|>|\{|\}|\*")


@dataclass(frozen=True)
class Reference:
    source: Path  # the referring file
    line: int
    target: str  # as written
    kind: str  # "link", "path", "test" (a test file) or "test name"

    def where(self, root: Path) -> str:
        return f"{self.source.relative_to(root).as_posix()}:{self.line}: {self.target!r} ({self.kind})"


# -- collecting the files and their text ------------------------------------------------------------------
def scanned_files(root: Path) -> list[Path]:
    """Markdown and Python files of the repository, outside environments, caches and run outputs."""
    return scanned_files_with(root, *SCANNED)


def scanned_files_with(root: Path, *endings: str) -> list[Path]:
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        rel = Path(dirpath).relative_to(root)
        dirnames[:] = sorted(
            d
            for d in dirnames
            if d not in SKIP_DIRS
            and not d.endswith(".egg-info")
            and not (rel == Path(".") and d in SKIP_TOP)
            and not (rel.as_posix() == "benchmarks/results" and d == "logs")
        )
        out.extend(Path(dirpath) / f for f in sorted(filenames) if f.endswith(endings))
    return out


def python_text(path: Path) -> list[tuple[int, str]]:
    """``(first line, text)`` of every comment and docstring of a Python file."""
    source = path.read_text(encoding="utf-8")
    chunks: list[tuple[int, str]] = []
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            chunks.append((tok.start[0], tok.string))
    tree = ast.parse(source)
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                if isinstance(body[0].value.value, str):
                    chunks.append((body[0].lineno, body[0].value.value))
    return chunks


def text_chunks(path: Path) -> list[tuple[int, str]]:
    if path.suffix == ".py":
        return python_text(path)
    return [(i + 1, line) for i, line in enumerate(path.read_text(encoding="utf-8").splitlines())]


def references(path: Path, root: Path | None = None) -> list[Reference]:
    """Every reference in ``path`` (see the module docstring); ``root``: the repository, whose ``docs/``
    pages also have their test names checked."""
    in_docs = root is not None and path.parent == root / "docs"
    refs = []
    for first, text in text_chunks(path):
        for offset, line in enumerate(text.splitlines()):
            n = first + offset
            if path.suffix == ".md":
                for m in LINK_RE.finditer(line):
                    refs.append(Reference(path, n, m.group(1), "link"))
                line = LINK_RE.sub(lambda m: " ", line)  # a link's target is checked as a link only
            for m in PATH_RE.finditer(line):
                target = m.group(1)
                first_part = re.sub(r"^(?:\./)+", "", target).split("/")[0]
                if "/" in target and (first_part in ROOTS + PACKAGE_DIRS or first_part == ".."):
                    refs.append(Reference(path, n, target, "path"))
            for m in TEST_NAME_RE.finditer(line):
                refs.append(Reference(path, n, m.group(1), "test"))
            for m in TEST_FUNC_RE.finditer(line) if in_docs else ():
                refs.append(Reference(path, n, m.group(1), "test name"))
    return refs


def forbidden_phrases(path: Path) -> list[str]:
    found = []
    for first, text in text_chunks(path):
        for offset, line in enumerate(text.splitlines()):
            if any(pattern.search(line) for pattern in FORBIDDEN):
                found.append(f"{path.name}:{first + offset}: {line.strip()!r}")
    return found


# -- resolving -------------------------------------------------------------------------------------------
def package_root(path: Path, root: Path) -> Path:
    """The nearest folder above ``path`` holding a ``pyproject.toml`` (the repository root at most)."""
    for parent in path.parents:
        if (parent / "pyproject.toml").is_file() or parent == root:
            return parent
    return root


def github_slug(heading: str) -> str:
    """The anchor GitHub gives a heading: markup dropped, lower case, punctuation removed, spaces -> '-'."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # links: their text
    text = text.replace("`", "").strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(md: Path) -> set[str]:
    """The anchors of a markdown file's headings (repeated headings get -1, -2, ... as on GitHub)."""
    seen: dict[str, int] = {}
    out = set()
    in_code = False
    for line in md.read_text(encoding="utf-8").splitlines():
        if line.lstrip().startswith("```"):
            in_code = not in_code
            continue
        m = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if in_code or not m:
            continue
        slug = github_slug(m.group(1))
        if slug in seen:
            seen[slug] += 1
            slug = f"{slug}-{seen[slug]}"
        else:
            seen[slug] = 0
        out.add(slug)
    return out


def _generated(path: Path, root: Path) -> bool:
    try:
        rel = path.resolve().relative_to(root.resolve()).as_posix()
    except ValueError:
        return False
    return any(fnmatch.fnmatch(rel, pattern) for pattern in GENERATED)


def package_roots(root: Path) -> list[Path]:
    """The repository's packages: the folders below the root holding a ``pyproject.toml``."""
    return sorted(p.parent for p in scanned_files_with(root, "pyproject.toml") if p.parent != root)


def problem(ref: Reference, root: Path, test_names: set[str], packages: list[Path] = ()) -> str | None:
    """Why ``ref`` does not resolve, or None when it does (or is not a reference to check)."""
    target = ref.target
    if ref.kind == "test":
        return None if target in test_names else "no test file of this name in the repository"
    if ref.kind == "test name":
        found = target in test_names or f"{target}.py" in test_names
        return None if found else "no test function or test file of this name in the repository"
    if ref.kind == "link":
        if SCHEME_RE.match(target) or target.startswith("//"):
            return None  # a URL
        path_part, _, anchor = target.partition("#")
        if not path_part:  # a link to a heading of this file
            return None if anchor in anchors(ref.source) else f"no heading #{anchor} here"
        dest = (ref.source.parent / path_part).resolve()
        if not dest.exists():
            return None if _generated(dest, root) else "no such file or folder"
        if anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            return f"{path_part} has no heading #{anchor}"
        return None
    if PLACEHOLDER_RE.search(target):
        return None
    bases = [ref.source.parent, package_root(ref.source, root), root]
    if bases[1] == root and target.split("/")[0] in PACKAGE_DIRS:
        bases += packages  # a top-level document naming a package's file by its package-relative path
    if any((base / target).exists() for base in bases):
        return None
    if any(_generated(base / target, root) for base in bases):
        return None
    return "no such file (relative to the file, its package or the repository root)"


@dataclass
class ScanResult:
    checked: list[Reference]
    broken: list[str]
    forbidden: list[str]


def scan(root: Path) -> ScanResult:
    files = scanned_files(root)
    test_files = [p for p in files if p.name.startswith("test_") and p.suffix == ".py"]
    test_names = {p.name for p in test_files}
    for p in test_files:
        test_names.update(TEST_DEF_RE.findall(p.read_text(encoding="utf-8")))
    packages = package_roots(root)
    checked, broken, bad_phrases = [], [], []
    for path in files:
        for ref in references(path, root):
            checked.append(ref)
            why = problem(ref, root, test_names, packages)
            if why:
                broken.append(f"{ref.where(root)}: {why}")
        bad_phrases.extend(f"{path.relative_to(root).parent.as_posix()}/{p}" for p in forbidden_phrases(path))
    return ScanResult(checked, broken, bad_phrases)


# -- the repository -----------------------------------------------------------------------------------------
def _is_repository(root: Path) -> bool:
    return (root / "pyproject.toml").is_file() and (root / "docs").is_dir() and (root / "shared").is_dir()


@pytest.fixture(scope="module")
def repository() -> ScanResult:
    assert _is_repository(ROOT), f"{ROOT} is not a checkout of the repository (no docs/ or shared/ there)"
    return scan(ROOT)


def test_every_reference_in_the_repository_resolves(repository):
    assert not repository.broken, "references that do not resolve:\n" + "\n".join(repository.broken)


def test_no_reference_points_outside_the_repository(repository):
    assert not repository.forbidden, "text pointing outside the repository:\n" + "\n".join(
        repository.forbidden
    )


def test_the_docs_are_linked_and_reference_the_code(repository):
    """The scan sees the documentation: docs/ links each component's page and each page names code."""
    by_source: dict[str, list[Reference]] = {}
    for ref in repository.checked:
        by_source.setdefault(ref.source.relative_to(ROOT).as_posix(), []).append(ref)
    index = {r.target for r in by_source.get("docs/README.md", [])}
    pages = tuple(f"{name}-equations.md" for name in ("spikecore", "tdformer", "spiliformer", "sae-brainmap"))
    assert set(pages) <= {t.split("#")[0] for t in index}
    for page in pages:
        refs = by_source.get(f"docs/{page}", [])
        assert sum(r.target.endswith(".py") for r in refs) >= 5, page
    readme = {r.target for r in by_source.get("README.md", [])}
    assert "docs/README.md" in readme


# -- the scanner on a synthetic tree ------------------------------------------------------------------
def _tree(tmp_path: Path) -> Path:
    files = {
        "pyproject.toml": "",
        "README.md": (
            "# Top\n\nSee [the docs](docs/README.md) and `docs/a.md`; [a section](docs/a.md#the-loss).\n"
        ),
        "docs/README.md": "# Docs\n\n- [a](a.md)\n- [pkg](../packages/p/README.md#usage)\n",
        "docs/a.md": (
            "# A\n\n## The loss\n\n"
            "Code: `packages/p/src/p/mod.py`, tested in `packages/p/tests/test_mod.py`,\n"
            "test_mod.py (`test_checks_mod`). Ignored: `runs/x/last.ckpt`, <https://example.org/a.md>,\n"
            "`/path/to/x.py`,\n"
            "`cifar10/model.py` (another project), `packages/p/configs/{a,b}.yaml`, `maps/best.png`,\n"
            "`~/data/x.py`, [web](https://example.org/docs/missing.md), `packages/p/src/p/layer_XX.py`,\n"
            "`benchmarks/results/lif-cuda.json` (written by a GPU run).\n"
        ),
        "packages/p/pyproject.toml": "",
        "packages/p/README.md": (
            "# p\n\n## Usage\n\nSee `tests/test_mod.py` and [the docs](../../docs/a.md).\n"
            "Set `test_fraction` in `configs/c.yaml` (an option, not a test: only docs/ pages name tests).\n"
        ),
        "packages/p/src/p/mod.py": (
            '"""The module; equations in docs/a.md."""\n\n'
            "X = 'docs/not_a_reference.md'  # a string in code is not a docstring\n\n\n"
            "def f():\n"
            '    """See ``tests/test_mod.py``."""\n'
            "    return 1  # and ../../../../docs/README.md\n"
        ),
        "packages/p/tests/test_mod.py": (
            '"""Checks packages/p/src/p/mod.py."""\n\n\ndef test_checks_mod():\n    pass\n'
        ),
        "packages/p/configs/c.yaml": "test_fraction: 0.2\n",
    }
    for name, text in files.items():
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    (tmp_path / "benchmarks/results").mkdir(parents=True)
    return tmp_path


def test_scanner_passes_a_tree_whose_references_all_resolve(tmp_path):
    result = scan(_tree(tmp_path))
    assert result.broken == [] and result.forbidden == []
    targets = {r.target for r in result.checked}
    assert {"docs/a.md", "packages/p/src/p/mod.py", "packages/p/tests/test_mod.py", "test_mod.py"} <= targets
    assert {"tests/test_mod.py", "configs/c.yaml"} <= targets  # package-relative, from the package's files
    assert "test_checks_mod" in targets and "test_fraction" not in targets  # test names: docs/ pages only
    assert {"../../docs/a.md", "../packages/p/README.md#usage", "../../../../docs/README.md"} <= targets
    assert "docs/not_a_reference.md" not in targets  # code strings are not read
    assert "cifar10/model.py" not in targets and "runs/x/last.ckpt" not in targets


@pytest.mark.parametrize(
    "remove, expected",
    [
        (
            "docs/a.md",
            [
                "README.md:3: 'docs/a.md' (path)",
                "README.md:3: 'docs/a.md#the-loss' (link)",
                "docs/README.md:3: 'a.md' (link)",
                "packages/p/README.md:5: '../../docs/a.md' (link)",
                "packages/p/src/p/mod.py:1: 'docs/a.md' (path)",
            ],
        ),
        (
            "packages/p/src/p/mod.py",
            [
                "docs/a.md:5: 'packages/p/src/p/mod.py' (path)",
                "packages/p/tests/test_mod.py:1: 'packages/p/src/p/mod.py' (path)",
            ],
        ),
        (
            "packages/p/tests/test_mod.py",
            [
                "docs/a.md:5: 'packages/p/tests/test_mod.py' (path)",
                "docs/a.md:6: 'test_mod.py' (test)",
                "docs/a.md:6: 'test_checks_mod' (test name)",
                "packages/p/README.md:5: 'tests/test_mod.py' (path)",
                "packages/p/src/p/mod.py:7: 'tests/test_mod.py' (path)",
            ],
        ),
        ("packages/p/README.md", ["docs/README.md:4: '../packages/p/README.md#usage' (link)"]),
        ("packages/p/configs/c.yaml", ["packages/p/README.md:6: 'configs/c.yaml' (path)"]),
    ],
)
def test_scanner_fails_when_a_referenced_file_is_removed(tmp_path, remove, expected):
    root = _tree(tmp_path)
    (root / remove).unlink()
    broken = scan(root).broken
    assert len(broken) == len(expected), broken
    for fragment in expected:
        assert any(b.startswith(fragment) for b in broken), (fragment, broken)


def test_scanner_checks_anchors_test_names_and_refuses_outside_references(tmp_path):
    root = _tree(tmp_path)
    (root / "packages/p/tests/test_mod.py").write_text("def test_renamed():\n    pass\n")
    assert [b.split(": ", 1)[1] for b in scan(root).broken] == [
        "'test_checks_mod' (test name): no test function or test file of this name in the repository"
    ]
    root = _tree(tmp_path / "again")
    (root / "docs/a.md").write_text((root / "docs/a.md").read_text().replace("## The loss", "## Loss"))
    broken = scan(root).broken
    assert any("docs/a.md#the-loss" in b and "no heading" in b for b in broken), broken
    (root / "docs/b.md").write_text(f"As the spec section 3 says.\nSee ../{OUTSIDE}/x.md.\n")
    assert len(scan(root).forbidden) == 2


def test_github_slugs():
    assert github_slug("Analysis (`tdformer analyze`)") == "analysis-tdformer-analyze"
    assert github_slug("1. Multi-step LIF: charge, fire, reset") == "1-multi-step-lif-charge-fire-reset"
    assert github_slug("FF-LiDiff / FB-LiDiff") == "ff-lidiff--fb-lidiff"
