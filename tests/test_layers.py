"""The import rules of docs/architecture.md, checked by running the very command printed there.

The command must print nothing on this tree, and must print the offending line once a rule is broken."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MARKER = "<!-- layer-check -->"


def layer_check_command() -> str:
    doc = (REPO / "docs" / "architecture.md").read_text()
    assert MARKER in doc, "docs/architecture.md lost its layer-check block"
    block = re.search(r"```sh\n(.*?)```", doc[doc.index(MARKER):], re.S)
    assert block, "no ```sh block after the layer-check marker"
    return block.group(1)


def run_check(tree: Path) -> str:
    out = subprocess.run(["bash", "-c", layer_check_command()], cwd=tree, capture_output=True, text=True, timeout=60)
    assert out.returncode in (0, 1), out.stderr  # grep: 1 = nothing found; 2 = a broken command
    assert not out.stderr, out.stderr
    return out.stdout


def test_import_rules_hold():
    assert run_check(REPO) == ""


def test_import_rules_catch_each_kind_of_violation(tmp_path):
    tree = tmp_path / "tree"
    shutil.copytree(REPO / "luoagent", tree / "luoagent", ignore=shutil.ignore_patterns("__pycache__", "*.so"))
    planted = {
        "luoagent/workflows/update.py": "from luoagent.lab import boot\n",      # production -> lab
        "luoagent/adapters/kexec.py": "from luoagent.workflows import vm\n",    # adapter -> workflow
        "luoagent/adapters/luo.py": "from luoagent import manifest\n",          # adapter -> manifest
        "luoagent/workflows/vm.py": "    import luoagent.cli\n",                 # workflow -> cli
    }
    for rel, line in planted.items():
        path = tree / rel
        path.write_text(path.read_text() + line)
    found = run_check(tree)
    for rel in planted:
        assert rel in found, f"the layer check missed {rel}: {found!r}"
