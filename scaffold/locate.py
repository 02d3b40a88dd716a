"""Find a model's `modeling_*.py` and `configuration_*.py` without importing them (nor transformers, unless a
model_type lives in another model's folder)."""

from __future__ import annotations

import difflib
import importlib.metadata
import importlib.util
from dataclasses import dataclass
from pathlib import Path

from scaffold.errors import ScaffoldError


@dataclass(frozen=True)
class ModelSource:
    """Where a model's code is. `package` resolves its relative imports; `config_module` is where its config
    class is imported from by the port; a folder model's configuration file is copied into the port."""

    name: str
    modeling_path: Path
    configuration_path: Path
    package: str
    transformers_version: str
    origin: str
    copy_configuration: bool = False

    @property
    def display_modeling(self) -> str:
        """The modeling file as the header names it: stable across machines (no absolute path)."""
        return f"{self.origin}/{self.modeling_path.name}"

    @property
    def regenerate_command(self) -> str:
        source = "transformers" if not self.copy_configuration else f"{self.origin}/"
        return f"recipes-scaffold {self.name} --from {source}"

    @property
    def config_module(self) -> str:
        return f"{self.package}.{self.configuration_path.stem}"


def transformers_models_dir() -> Path:
    spec = importlib.util.find_spec("transformers")
    if spec is None or not spec.submodule_search_locations:
        raise ScaffoldError("transformers is not installed; install it to scaffold from it (pip install transformers)")
    return Path(next(iter(spec.submodule_search_locations))) / "models"


def causal_lm_models(models_dir: Path) -> list[str]:
    """Model folders whose modeling file defines a *ForCausalLM class (read as text, never imported)."""
    names = []
    for folder in models_dir.iterdir():
        modeling = folder / f"modeling_{folder.name}.py"
        if modeling.is_file() and "ForCausalLM(" in modeling.read_text(encoding="utf-8"):
            names.append(folder.name)
    return sorted(names)


def _folder_name(models_dir: Path, name: str) -> str:
    """The models/ folder of `name`: its own, or, for a model_type defined in another model's files (gemma3_text
    in models/gemma3), the folder transformers' own model_type table names."""
    if (models_dir / name).is_dir():
        return name
    from transformers.models.auto.configuration_auto import model_type_to_module_name

    return model_type_to_module_name(name)


def locate_transformers_model(name: str) -> ModelSource:
    models_dir = transformers_models_dir()
    version = importlib.metadata.version("transformers")
    folder_name = _folder_name(models_dir, name)
    folder = models_dir / folder_name
    modeling = folder / f"modeling_{folder_name}.py"
    configuration = folder / f"configuration_{folder_name}.py"
    if not modeling.is_file():
        close = difflib.get_close_matches(name, causal_lm_models(models_dir), n=3, cutoff=0.5)
        hint = f"; did you mean {', '.join(close)}?" if close else f"; the causal LMs are the folders of {models_dir}"
        raise ScaffoldError(f"transformers {version} has no model named '{name}'{hint}")
    if not configuration.is_file():
        raise ScaffoldError(f"transformers {version} ships {modeling.name} but no {configuration.name} for '{name}'")
    return ModelSource(name, modeling, configuration, f"transformers.models.{folder_name}", version,
                       f"transformers/models/{folder_name}")


def locate_folder_model(name: str, folder: Path) -> ModelSource:
    """A model whose code ships with its checkpoint (trust_remote_code style): config.json, one
    configuration_*.py and one modeling_*.py. The files are only read, never imported."""
    if not folder.is_dir():
        raise ScaffoldError(f"--from {folder}: no such folder (give 'transformers' or a model folder)")
    if not (folder / "config.json").is_file():
        raise ScaffoldError(f"--from {folder}: no config.json; a model folder holds config.json, "
                            f"configuration_*.py and modeling_*.py")
    found = {}
    for kind in ("modeling", "configuration"):
        candidates = sorted(folder.glob(f"{kind}_*.py"))
        if len(candidates) != 1:
            listed = ", ".join(path.name for path in candidates) or "none"
            raise ScaffoldError(f"--from {folder}: expected exactly one {kind}_*.py, found {listed}")
        found[kind] = candidates[0]
    if not name.isidentifier():
        raise ScaffoldError(f"model name '{name}' must be a Python identifier (it names generated_models/{name})")
    version = importlib.metadata.version("transformers")
    return ModelSource(name, found["modeling"], found["configuration"], f"generated_models.{name}", version,
                       folder.name, copy_configuration=True)
