"""Write generated files atomically, each headed with its origin and a hash of what was written.

The hash lets a later run tell a file nobody touched (safe to replace) from one a person edited: that one is
kept (the run is refused) unless --force replaces it or --upgrade merges the person's edits into the new output.
A pristine copy of every generated file under ROOT/.recipes-scaffold/pristine/ is the base of that three-way
merge (`git merge-file`); conflicts are written with markers and reported, never dropped.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from scaffold.errors import ScaffoldError

HASH_MARK = "recipes-scaffold-sha256:"
PRISTINE_DIR = Path(".recipes-scaffold") / "pristine"
COMMENT_STYLES = {".py": ("# ", ""), ".yaml": ("# ", ""), ".md": ("<!-- ", " -->")}


@dataclass(frozen=True)
class WriteReport:
    written: list[Path]
    unchanged: list[Path]
    merged: list[Path] = field(default_factory=list)
    conflicted: list[Path] = field(default_factory=list)


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


def write_files(root: Path, files: dict[str, str], force: bool = False, upgrade: bool = False) -> WriteReport:
    """Write `files` (relative path → full text) under `root`.

    A file changed since it was generated stops the run before anything is written, unless `force` (replace
    it) or `upgrade` (three-way merge of its edits into the new text).
    """
    edited = []
    for relative_path, text in files.items():
        path = root / relative_path
        if path.is_file():
            current = path.read_text(encoding="utf-8")
            if current != text and not is_unedited(current):
                edited.append(relative_path)
    if edited and not (force or upgrade):
        raise ScaffoldError(
            f"refusing to overwrite files changed since they were generated: {', '.join(edited)} "
            f"(under {root}); pass --upgrade to merge your edits into the new output, or --force to replace them"
        )
    merged_texts = {path: _merge(root, path, files[path]) for path in edited} if upgrade else {}
    written, unchanged, merged, conflicted = [], [], [], []
    for relative_path, text in files.items():
        path = root / relative_path
        final, conflicts = merged_texts.get(relative_path, (text, 0))
        if path.is_file() and path.read_text(encoding="utf-8") == final:
            unchanged.append(path)
        else:
            _atomic_write(path, final)
            written.append(path)
        if relative_path in merged_texts:
            (conflicted if conflicts else merged).append(path)
        _atomic_write(root / PRISTINE_DIR / relative_path, text)
    return WriteReport(written, unchanged, merged, conflicted)


def _merge(root: Path, relative_path: str, new_text: str) -> tuple[str, int]:
    """The person's edits (base → current) applied to the new output; returns (text, conflict count)."""
    base_path = root / PRISTINE_DIR / relative_path
    if not base_path.is_file():
        raise ScaffoldError(
            f"cannot --upgrade {relative_path}: its generated original ({base_path}) is missing, so your edits "
            f"cannot be told apart; merge by hand or pass --force"
        )
    git = shutil.which("git")
    if git is None:
        raise ScaffoldError("--upgrade needs git (git merge-file) for the three-way merge; install git")
    with tempfile.TemporaryDirectory() as scratch:
        current, base, new = Path(scratch) / "current", Path(scratch) / "base", Path(scratch) / "new"
        shutil.copyfile(root / relative_path, current)
        shutil.copyfile(base_path, base)
        new.write_text(new_text, encoding="utf-8")
        result = subprocess.run(
            [git, "merge-file", "-p", "-L", f"{relative_path} (yours)", "-L", "previous generation",
             "-L", "new generation", str(current), str(base), str(new)],
            capture_output=True, text=True,
        )
    if result.returncode < 0 or result.returncode > 127:
        raise ScaffoldError(f"git merge-file failed on {relative_path}: {result.stderr.strip()}")
    return result.stdout, result.returncode


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
