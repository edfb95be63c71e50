"""Rules of the code layout that a reviewer would otherwise have to remember."""

import ast
import re
from pathlib import Path

import pytest

import vqkernels
from vqkernels import ops

ROOT = Path(vqkernels.__file__).resolve().parent
REPO = ROOT.parent


def _imports(path: Path) -> list[tuple[str, list[str]]]:
    """``(module, names)`` of every import in ``path``, relative imports resolved to ``vqkernels.*`` names."""
    pkg = ".".join(path.relative_to(ROOT.parent).with_suffix("").parts[:-1])
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [(a.name, []) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = pkg.split(".")
            mod = (
                ".".join(base[: len(base) - node.level + 1] + ([node.module] if node.module else []))
                if node.level
                else node.module
            )
            out.append((mod, [a.name for a in node.names]))
    return out


def test_nn_imports_only_the_public_ops_api():
    """The layers run on every backend because they go through vqkernels.ops only: no backend, reference or
    numerics module, and no private name of ops."""
    for path in sorted((ROOT / "nn").rglob("*.py")):
        for mod, names in _imports(path):
            if not mod.startswith("vqkernels") or mod.startswith("vqkernels.nn"):
                continue
            if mod == "vqkernels":  # from .. import ops
                assert names == ["ops"], f"{path.name} imports {names} from vqkernels"
                continue
            assert mod == "vqkernels.ops", f"{path.name} imports {mod}"
            private = [n for n in names if n.startswith("_") or n not in ops.__all__]
            assert not private, f"{path.name} imports non-public names of vqkernels.ops: {private}"


def test_ops_all_is_what_it_exports():
    for name in ops.__all__:
        assert hasattr(ops, name), name


def test_no_reference_to_documents_outside_the_repository():
    """Comments cite the README's method section or the papers, never a file a clone does not have."""
    pattern = re.compile(r"METHODS(\.md)?\s*§|METHODS\.md|PERFORMANCE\.md|ARCHITECTURE\.md|shared/docs")
    offenders = []
    for path in [
        *REPO.glob("vqkernels/**/*.py"),
        *REPO.glob("csrc/**/*"),
        *REPO.glob("tests/**/*.py"),
        *REPO.glob("benchmarks/*.py"),
        REPO / "README.md",
        REPO / "Makefile",
        REPO / "setup.py",
    ]:
        if path.is_file() and path.suffix in (".py", ".cpp", ".h", ".cu", ".md", "") and path != Path(__file__):
            for i, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
                if pattern.search(line):
                    offenders.append(f"{path.relative_to(REPO)}:{i}: {line.strip()}")
    assert not offenders, "\n".join(offenders)


def test_one_version_source():
    """``vqkernels/_version.py`` is the only place the version is written; pyproject.toml reads it from there."""
    tomllib = pytest.importorskip("tomllib")
    from vqkernels._version import __version__

    meta = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert "version" not in meta["project"] and "version" in meta["project"]["dynamic"]
    assert meta["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "vqkernels._version.__version__"}
    assert vqkernels.__version__ == __version__


def test_layers_are_reexported_from_the_package_root():
    import vqkernels.nn as vnn

    for name in (
        "VectorQuant",
        "GroupVectorQuant",
        "ResidualVectorQuant",
        "VectorQuantiser",
        "VectorQuantize",
        "no_vq",
    ):
        assert getattr(vqkernels, name) is getattr(vnn, name), name
    for name in ("nearest_code", "quantize", "code_stats", "sample_code", "Quantized", "METRICS"):
        assert getattr(vqkernels, name) is getattr(ops, name), name


def test_ruff_is_pinned_once_for_make_and_pre_commit():
    """``make lint`` (and .ci/run) and the pre-commit hooks run the same ruff, so they never disagree on a file."""
    pin = re.search(r"^RUFF_SPEC\s*\?=\s*ruff==(\S+)$", (REPO / "Makefile").read_text(), re.MULTILINE)
    hook = re.search(r"ruff-pre-commit\s+rev:\s*v(\S+)", (REPO / ".pre-commit-config.yaml").read_text())
    assert pin and hook and pin.group(1) == hook.group(1), (pin, hook)
    assert "make lint" in (REPO / ".ci" / "run").read_text()
    assert (REPO / "LICENSE").read_text().startswith("MIT License")


def test_readme_code_map_lists_every_file():
    """The README's code map has one line per file: a file added without a line there fails here."""
    import subprocess

    try:
        tracked = subprocess.run(
            ["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True, timeout=60
        ).stdout.split()
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    text = (REPO / "README.md").read_text()
    block = text[text.index("One line per file:") :].split("```")[1]
    listed = {line.split()[0] for line in block.splitlines() if line.strip()}
    missing = [
        f
        for f in tracked
        if f not in listed and not f.startswith("benchmarks/results/") and f not in ("README.md", ".gitignore")
    ]
    assert not missing, missing
    stale = [p for p in listed if not p.endswith("/") and p not in tracked]
    assert not stale, stale
