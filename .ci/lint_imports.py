"""
Check the import contract ([tool.importlinter] in pyproject.toml) with import-linter.

import-linter (through grimp) only analyses packages, and this repository is a
flat set of top-level modules run as scripts (import-linter issue #349: single
modules are not supported as root packages). So this mirrors the modules into a
temporary package named `duocap`, rewriting each import of a project module into
its package-qualified form (`import data` -> `from duocap import data`), and
runs lint-imports on that package. Imports inside functions are rewritten too,
so a function-level import that would hide a cycle is caught like any other.
"""

import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def module_name(path):
    # numbered entry points are not identifiers: 08_train_explained -> train_explained_08
    number, _, rest = path.stem.partition("_")
    return f"{rest}_{number}" if number.isdigit() else path.stem


def main():
    sources = sorted(REPO.glob("*.py"))
    names = {p.stem: module_name(p) for p in sources}
    alternatives = "|".join(map(re.escape, names))
    plain = re.compile(rf"^(\s*)import ({alternatives})\b(.*)$", re.M)
    dotted = re.compile(rf"^(\s*)from ({alternatives}) import\b", re.M)
    with tempfile.TemporaryDirectory() as tmp:
        package = Path(tmp) / "duocap"
        package.mkdir()
        (package / "__init__.py").write_text("")
        for path in sources:
            text = plain.sub(lambda m: f"{m[1]}from duocap import {names[m[2]]}{m[3]}", path.read_text())
            text = dotted.sub(lambda m: f"{m[1]}from duocap.{names[m[2]]} import", text)
            (package / f"{names[path.stem]}.py").write_text(text)
        return subprocess.call(
            ["lint-imports", str(REPO / "pyproject.toml"), "--no-cache"],
            cwd=tmp,
            env={"PYTHONPATH": tmp, "PATH": os.environ["PATH"]},
        )


if __name__ == "__main__":
    sys.exit(main())
