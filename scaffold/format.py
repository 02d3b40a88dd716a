"""Format generated Python with ruff (pinned, so output is byte-stable): HF's own style, 119 columns."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from scaffold.errors import ScaffoldError

LINE_LENGTH = 119


def _ruff() -> str:
    candidate = Path(sys.executable).parent / "ruff"
    return str(candidate) if candidate.exists() else "ruff"


def format_python(source: str, filename: str) -> str:
    try:
        result = subprocess.run(
            [_ruff(), "format", "--isolated", f"--line-length={LINE_LENGTH}", f"--stdin-filename={filename}", "-"],
            input=source, capture_output=True, text=True, check=False,
        )
    except FileNotFoundError:
        raise ScaffoldError("ruff is not installed; reinstall recipes-scaffold (pip install -e .)") from None
    if result.returncode != 0:
        raise ScaffoldError(f"generated {filename} does not format: {result.stderr.strip()}")
    return result.stdout
