"""The generator as one call: locate the model's source, inspect it, render the port, write it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from scaffold.inspect import inspect_model
from scaffold.locate import locate_folder_model, locate_transformers_model
from scaffold.render import header_lines, port_files, runner_import_path
from scaffold.write import WriteReport, stamp, write_files


@dataclass(frozen=True)
class GeneratedPort:
    report: WriteReport
    runner: str  # the runner class as "module:Class", importable with the output root on sys.path


def generate(model: str, source: str, out: Path, force: bool = False, upgrade: bool = False) -> GeneratedPort:
    """Write the port of `model` (from the installed transformers, or `source` as a remote-code folder) under
    `out`."""
    if source == "transformers":
        model_source = locate_transformers_model(model)
    else:
        model_source = locate_folder_model(model, Path(source))
    spec = inspect_model(model_source)
    files = {path: stamp(path, header_lines(spec, path), body) for path, body in port_files(spec).items()}
    return GeneratedPort(write_files(out, files, force=force, upgrade=upgrade), runner_import_path(spec))
