"""Find a model's `modeling_*.py` and `configuration_*.py` without importing them (nor transformers, unless a
model_type lives in another model's folder)."""

from __future__ import annotations

import ast
import difflib
import functools
import importlib.metadata
import importlib.util
import json
import re
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
    # The causal-LM class transformers' auto mapping (or a folder's auto_map) names, when one does, and the
    # mapping's model_type it is named for.
    causal_lm_class: str | None = None
    model_type: str | None = None

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
        if self.copy_configuration:
            return f"{self.package}.{self.configuration_path.stem}"
        # transformers' own: the configuration's folder, which may not be the modeling file's (InternLM3's config
        # with Llama's modeling).
        return f"transformers.models.{self.configuration_path.parent.name}.{self.configuration_path.stem}"


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


@functools.cache
def auto_causal_lm_classes(models_dir: Path) -> dict[str, str]:
    """model_type → the class AutoModelForCausalLM builds, read from transformers' auto mapping as text."""
    tree = ast.parse((models_dir / "auto" / "modeling_auto.py").read_text(encoding="utf-8"))
    for node in tree.body:
        if (isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name)
                and node.targets[0].id == "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES"):
            return dict(ast.literal_eval(node.value.args[0]))
    return {}


def _auto_model_type(models_dir: Path, name: str) -> str | None:
    """The auto mapping's model_type `name` stands for (gpt-sw3 may be asked for as gpt_sw3)."""
    classes = auto_causal_lm_classes(models_dir)
    return next((key for key in (name, name.replace("_", "-")) if key in classes), None)


def _file_defining(models_dir: Path, class_name: str) -> Path | None:
    """The modeling file that defines `class_name` (gpt-sw3's GPT2LMHeadModel is gpt2's)."""
    return next((path for path in sorted(models_dir.glob("*/modeling_*.py")) if _defines(path, class_name)), None)


def _defines(path: Path, class_name: str) -> bool:
    return path.is_file() and re.search(rf"^class {re.escape(class_name)}\(", path.read_text(encoding="utf-8"),
                                        re.MULTILINE) is not None


def locate_transformers_model(name: str) -> ModelSource:
    models_dir = transformers_models_dir()
    version = importlib.metadata.version("transformers")
    folder_name = _folder_name(models_dir, name)
    folder = models_dir / folder_name
    modeling = folder / f"modeling_{folder_name}.py"
    model_type = _auto_model_type(models_dir, name)
    causal_lm = auto_causal_lm_classes(models_dir)[model_type] if model_type else None
    own_configuration = folder / f"configuration_{folder_name}.py"
    if causal_lm and not _defines(modeling, causal_lm):
        # The class lives in another file: a variant's own (data2vec-text) or the model it reuses (gpt-sw3's gpt2).
        modeling = _file_defining(models_dir, causal_lm) or modeling
        folder = modeling.parent
    configuration = folder / modeling.name.replace("modeling_", "configuration_", 1)
    if modeling.parent != own_configuration.parent and own_configuration.is_file():
        configuration = own_configuration  # InternLM3 runs Llama's code with its own config class
    if not modeling.is_file():
        close = difflib.get_close_matches(name, causal_lm_models(models_dir), n=3, cutoff=0.5)
        hint = f"; did you mean {', '.join(close)}?" if close else f"; the causal LMs are the folders of {models_dir}"
        raise ScaffoldError(f"transformers {version} has no model named '{name}'{hint}")
    if not configuration.is_file():
        raise ScaffoldError(f"transformers {version} ships {modeling.name} but no {configuration.name} for '{name}'")
    return ModelSource(name.replace("-", "_"), modeling, configuration, f"transformers.models.{folder.name}",
                       version, f"transformers/models/{folder.name}", causal_lm_class=causal_lm,
                       model_type=model_type)


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
                       folder.name, copy_configuration=True, causal_lm_class=_auto_map_causal_lm(folder))


def _auto_map_causal_lm(folder: Path) -> str | None:
    """The class config.json's `auto_map` names for AutoModelForCausalLM ("modeling_x.XLMHeadModel" → its name)."""
    try:
        auto_map = json.loads((folder / "config.json").read_text(encoding="utf-8")).get("auto_map") or {}
    except (json.JSONDecodeError, AttributeError):
        return None
    entry = auto_map.get("AutoModelForCausalLM") if isinstance(auto_map, dict) else None
    return entry.rpartition(".")[2] if isinstance(entry, str) else None
