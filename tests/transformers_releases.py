"""The transformers releases this project is proven on, and an environment for each.

The test environment has one release installed (a fresh one gets the release the committed ports are generated
from); every other proven release is unpacked, without dependencies, into build/transformers-<version>/ and put
first on PYTHONPATH of the child processes that need it. `python tests/transformers_releases.py install` (run by
`make test`) unpacks the ones the environment lacks.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# Oldest first; the newest is the one new generator rules must be proven on too.
PROVEN_RELEASES = ("5.23.0", "5.24.0")


def installed_release() -> str:
    from importlib.metadata import version

    return version("transformers")


def release_folder(version: str) -> Path:
    return REPO / "build" / f"transformers-{version}"


def python_path_for(version: str) -> list[str]:
    """What to put first on PYTHONPATH so that `import transformers` finds `version`."""
    if version == installed_release():
        return []
    folder = release_folder(version)
    if not (folder / "transformers").is_dir():
        raise FileNotFoundError(f"transformers {version} is not unpacked in {folder}; run `make test` or "
                                f"`python tests/transformers_releases.py install`")
    return [str(folder)]


def environment(version: str, *first_on_path: Path) -> dict[str, str]:
    """os.environ for a child process that imports transformers `version`, with `first_on_path` (a folder of
    generated ports) ahead of this repository."""
    entries = [*python_path_for(version), *map(str, first_on_path), str(REPO), os.environ.get("PYTHONPATH")]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, entries))}


def install_missing() -> None:
    for version in PROVEN_RELEASES:
        folder = release_folder(version)
        if version == installed_release() or (folder / "transformers").is_dir():
            continue
        staging = folder.with_name(folder.name + ".partial")
        shutil.rmtree(staging, ignore_errors=True)
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(staging),
                        f"transformers=={version}"], check=True)
        staging.rename(folder)


if __name__ == "__main__":
    if sys.argv[1:] != ["install"]:
        sys.exit("usage: python tests/transformers_releases.py install")
    install_missing()
