"""The architecture as contracts: import-linter's contracts in pyproject.toml hold, and a
deliberately wrong import breaks them (so the check can fail)."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LINT = ("import sys; from importlinter.cli import lint_imports; "
        "sys.exit(lint_imports(no_cache=True, no_logo=True))")


def _lint(cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", LINT], cwd=cwd, capture_output=True, text=True, timeout=300)


def test_import_contracts_hold():
    res = _lint(ROOT)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-2000:]
    assert "0 broken" in res.stdout


def _copy_sources(tmp_path: Path) -> Path:
    """The pyproject, engine, nodes and bench of this checkout (Python files only) in tmp_path."""
    only_py = shutil.ignore_patterns("data", "__pycache__", "*.safetensors", "*.gz")
    for name in ("ldm_core", "bench"):
        shutil.copytree(ROOT / name, tmp_path / name, ignore=only_py)
    shutil.copytree(ROOT / "nodes", tmp_path / "ldm_nodes", ignore=only_py)
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    return tmp_path


def _add_line(path: Path, line: str) -> None:
    text = path.read_text()
    head, sep, rest = text.partition("from __future__ import annotations\n")
    path.write_text(head + sep + line + "\n" + rest if sep else line + "\n" + text)


def test_a_network_importing_the_pipeline_breaks_the_layers(tmp_path):
    tree = _copy_sources(tmp_path)
    _add_line(tree / "ldm_core" / "networks" / "unet.py", "from ldm_core.pipeline import jobs  # wrong on purpose")
    res = _lint(tree)
    assert res.returncode != 0
    assert "ldm_core.networks is not allowed to import ldm_core.pipeline" in res.stdout, res.stdout[-3000:]


def test_torch_in_the_graph_runtime_or_the_lab_in_the_nodes_breaks_a_contract(tmp_path):
    tree = _copy_sources(tmp_path)
    _add_line(tree / "ldm_core" / "graph" / "cache.py", "import torch  # wrong on purpose")
    _add_line(tree / "ldm_nodes" / "image_nodes.py", "from ldm_core.lab import scenes  # wrong on purpose")
    res = _lint(tree)
    assert res.returncode != 0
    assert "ldm_core.graph is not allowed to import torch" in res.stdout, res.stdout[-3000:]
    assert "ldm_nodes is not allowed to import ldm_core.lab" in res.stdout, res.stdout[-3000:]
