"""Write generated files atomically, each headed with its origin and a hash of what was written.

The hash lets a later run tell a file nobody touched (safe to replace) from one a person edited (kept unless
--force).
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from scaffold.errors import ScaffoldError

HASH_MARK = "recipes-scaffold-sha256:"
COMMENT_STYLES = {".py": ("# ", ""), ".yaml": ("# ", ""), ".md": ("<!-- ", " -->")}


@dataclass(frozen=True)
class WriteReport:
    written: list[Path]
    unchanged: list[Path]


def stamp(relative_path: str, header: list[str], body: str) -> str:
    """The file's full text: header comment lines, then the body's hash line, then the body."""
    prefix, suffix = COMMENT_STYLES[Path(relative_path).suffix]
    lines = [*header, f"{HASH_MARK} {_digest(body)}"]
    return "".join(f"{prefix}{line}{suffix}\n" for line in lines) + body


def is_unedited(text: str) -> bool:
    """True when the text still hashes to what the generator recorded in it."""
    head, mark, rest = text.partition(HASH_MARK)
    if not mark:
        return False
    hash_line, newline, body = rest.partition("\n")
    recorded = hash_line.strip().removesuffix("-->").strip()
    return bool(newline) and recorded == _digest(body)


def write_files(root: Path, files: dict[str, str], force: bool = False) -> WriteReport:
    """Write `files` (relative path → full text) under `root`; nothing is written if any would clobber an edit."""
    edited = []
    for relative_path, text in files.items():
        path = root / relative_path
        if path.exists():
            current = path.read_text(encoding="utf-8")
            if current != text and not is_unedited(current):
                edited.append(relative_path)
    if edited and not force:
        raise ScaffoldError(
            f"refusing to overwrite files changed since they were generated: {', '.join(edited)} "
            f"(under {root}); pass --force to replace them"
        )
    written, unchanged = [], []
    for relative_path, text in files.items():
        path = root / relative_path
        if path.exists() and path.read_text(encoding="utf-8") == text:
            unchanged.append(path)
            continue
        _atomic_write(path, text)
        written.append(path)
    return WriteReport(written, unchanged)


def _atomic_write(path: Path, text: str) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as error:
        raise ScaffoldError(f"cannot write under {path.parent}: {error.strerror}") from None
    try:
        with os.fdopen(descriptor, "w", encoding="utf-8", newline="\n") as handle:
            handle.write(text)
        os.chmod(temporary, 0o644)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def _digest(body: str) -> str:
    return hashlib.sha256(body.encode("utf-8")).hexdigest()
