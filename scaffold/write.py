"""Write generated files atomically, each headed with its origin and a hash of what was written.

The hash lets a later run tell a file nobody touched (safe to replace) from one a person edited: that one is
kept (the run is refused) unless --force replaces it or --upgrade merges the person's edits into the new output.
The base of that three-way merge (`git merge-file`) is the file as it was generated, found by the hash its header
records: in the git history of ROOT (generated files are committed, so a fresh clone has every base), else in a
local copy under ROOT/.recipes-scaffold/pristine/ (git-ignored; it covers files generated but never committed).
Conflicts are written with markers and reported, never dropped.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from scaffold.errors import ScaffoldError

HASH_MARK = "recipes-scaffold-sha256:"
PRISTINE_DIR = Path(".recipes-scaffold") / "pristine"
# The local copies are a per-checkout cache: git history holds the committed bases.
LOCAL_COPIES_IGNORED = "# recipes-scaffold's local copies of generated files: never committed\n*\n"
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


def recorded_digest(text: str) -> str | None:
    """The body hash the generator recorded in the file's header, if it has one."""
    head, mark, rest = text.partition(HASH_MARK)
    if not mark:
        return None
    return rest.partition("\n")[0].strip().removesuffix("-->").strip()


def is_unedited(text: str) -> bool:
    """True when the text still hashes to what the generator recorded in it."""
    digest = recorded_digest(text)
    return digest is not None and digest == _body_digest(text)


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
    _atomic_write(root / PRISTINE_DIR.parent / ".gitignore", LOCAL_COPIES_IGNORED)
    return WriteReport(written, unchanged, merged, conflicted)


def _merge(root: Path, relative_path: str, new_text: str) -> tuple[str, int]:
    """The person's edits (base → current) applied to the new output; returns (text, conflict count)."""
    git = shutil.which("git")
    if git is None:
        raise ScaffoldError("--upgrade needs git (git merge-file) for the three-way merge; install git")
    current = (root / relative_path).read_text(encoding="utf-8")
    base = _generated_original(git, root, relative_path, recorded_digest(current))
    with tempfile.TemporaryDirectory() as scratch:
        current_file, base_file, new_file = Path(scratch) / "current", Path(scratch) / "base", Path(scratch) / "new"
        current_file.write_text(current, encoding="utf-8")
        base_file.write_text(base, encoding="utf-8")
        new_file.write_text(new_text, encoding="utf-8")
        result = subprocess.run(
            [git, "merge-file", "-p", "-L", f"{relative_path} (yours)", "-L", "previous generation",
             "-L", "new generation", str(current_file), str(base_file), str(new_file)],
            capture_output=True, text=True,
        )
    if result.returncode < 0 or result.returncode > 127:
        raise ScaffoldError(f"git merge-file failed on {relative_path}: {result.stderr.strip()}")
    return result.stdout, result.returncode


def _generated_original(git: str, root: Path, relative_path: str, digest: str | None) -> str:
    """The text the generator wrote when it recorded `digest`: the local copy, else the newest committed version
    of the file whose body still hashes to it."""
    if digest is not None:
        local = root / PRISTINE_DIR / relative_path
        candidates = [local.read_text(encoding="utf-8")] if local.is_file() else []
        for text in itertools.chain(candidates, _committed_versions(git, root, relative_path)):
            if _body_digest(text) == digest:
                return text
    raise ScaffoldError(
        f"cannot --upgrade {relative_path}: the file as generated (body hash {(digest or 'missing')[:12]}) is in "
        f"neither the git history of {root} nor {root / PRISTINE_DIR}, so your edits cannot be told apart; "
        f"commit generated files before editing them, or merge by hand and pass --force"
    )


def _committed_versions(git: str, root: Path, relative_path: str):
    """The file's committed texts, newest first (nothing when ROOT is not in a git work tree)."""
    log = subprocess.run([git, "-C", str(root), "log", "--format=%H", "--", relative_path],
                         capture_output=True, text=True)
    for commit in log.stdout.split() if log.returncode == 0 else []:
        shown = subprocess.run([git, "-C", str(root), "show", f"{commit}:./{relative_path}"],
                               capture_output=True, text=True, encoding="utf-8")
        if shown.returncode == 0:
            yield shown.stdout


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


def _body_digest(text: str) -> str | None:
    """The hash of what follows a stamped file's hash line (None for a text without one)."""
    head, mark, rest = text.partition(HASH_MARK)
    hash_line, newline, body = rest.partition("\n")
    return _digest(body) if mark and newline else None
