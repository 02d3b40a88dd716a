"""Load and validate `runner_settings` (the seed's YAML contract) once, before anything is built."""

from __future__ import annotations

import copy
import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from core.errors import SettingsError

EXE_MODES = ("eager", "inductor", "cuda_graph", "ge_graph", "acl_graph")
DTYPES = ("float32", "float16", "bfloat16")
DEVICES = ("auto", "npu", "cuda", "cpu")
TOKENIZER_MODES = ("default", "chat")
QUANT_WEIGHT_MODES = ("dequantize", "packed")
WEIGHT_QUANT = ("none", "int8", "int4")
WEIGHT_QUANT_GROUP_SIZES = (32, 64, 128, 256)
PLACEHOLDER_PREFIX = "/path/to/"


@dataclass(frozen=True)
class Field:
    kind: type
    default: Any = None
    required: bool = False
    choices: tuple = ()
    minimum: int | None = None
    nullable: bool = False
    item_kind: type | None = None  # for a list: the type of each item


@dataclass(frozen=True)
class Section:
    fields: dict[str, Field] = field(default_factory=dict)


SCHEMA = Section(
    {
        "model_name": Field(str, required=True),
        "model_path": Field(str, required=True),
        "exe_mode": Field(str, default="eager", choices=EXE_MODES),
        "world_size": Field(int, default=1, minimum=1),
        "model_config": Section(
            {
                "dtype": Field(str, default="bfloat16", choices=DTYPES),
                "with_ckpt": Field(bool, default=True),
                "enable_online_split_weight": Field(bool, default=True),
                "enable_profiler": Field(bool, default=False),
                "enable_weight_nz": Field(bool, default=False),
                "tokenizer_mode": Field(str, default="default", choices=TOKENIZER_MODES),
                # A quantized checkpoint's weights: dequantized once at load, or kept packed (mxfp4 experts).
                "quant_weight_mode": Field(str, default="dequantize", choices=QUANT_WEIGHT_MODES),
                # Float linear weights quantized at load, after the TP split (core/quantization/low_bit.py; CPU).
                "weight_quant": Field(str, default="none", choices=WEIGHT_QUANT),
                "weight_quant_group_size": Field(int, default=32, choices=WEIGHT_QUANT_GROUP_SIZES),
                "device": Field(str, default="auto", choices=DEVICES),
                # inductor modes: tune kernels while compiling (CPU: frozen weights and max-autotune GEMM templates,
                # recompiled by every process; false: inductor's default kernels, float weights on our AVX-512 kernel
                # where the CPU has one, and a graph the next process loads from inductor's cache). null: the
                # device's choice (CPU: on for float weights only without the AVX-512 kernels; CUDA: off).
                "compile_autotune": Field(bool, default=None, nullable=True),
                # inductor mode: the greedy decode step compiled ahead of time (CPU: an AOTInductor library whose C++
                # calls the kernels, core/backends/aot_step.py); null: the device's choice (CPU: on).
                "aot_decode_step": Field(bool, default=None, nullable=True),
                "seed": Field(int, default=42, minimum=0),
                "custom_params": Field(dict, default={}),
            }
        ),
        "data_config": Section(
            {
                "dataset": Field(str, default="default"),
                "input_max_len": Field(int, default=1024, minimum=1),
                "max_new_tokens": Field(int, default=32, minimum=1),
                "batch_size": Field(int, default=1, minimum=1),
                "max_position_embeddings": Field(int, default=None, minimum=1, nullable=True),
            }
        ),
        # Decoding: transformers' GenerationConfig names; null takes the checkpoint's generation_config.json
        # (else transformers' default), as `generate()` does. core/sampling.py checks the ranges.
        "sampling_config": Section(
            {
                "do_sample": Field(bool, default=None, nullable=True),
                "temperature": Field(float, default=None, nullable=True),
                "top_k": Field(int, default=None, nullable=True),
                "top_p": Field(float, default=None, nullable=True),
                "min_p": Field(float, default=None, nullable=True),
                "repetition_penalty": Field(float, default=None, nullable=True),
                "seed": Field(int, default=None, nullable=True, minimum=0),
                "stop_strings": Field(list, default=[], item_kind=str),
                "eos_token_id": Field(list, default=[], item_kind=int),
            }
        ),
        "parallel_config": Section(
            {
                "attn_tp_size": Field(int, default=1, minimum=1),
                "moe_tp_size": Field(int, default=1, minimum=1),
                "lmhead_tp_size": Field(int, default=1, minimum=1),
                "embed_tp_size": Field(int, default=1, minimum=1),
            }
        ),
    }
)

TYPE_NAMES = {str: "a string", int: "an integer", float: "a number", bool: "true or false", dict: "a mapping",
              list: "a list"}


def load_runner_settings(path: str | Path, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Read a runner_settings YAML file, apply `overrides` (dotted keys), validate and fill defaults."""
    path = Path(path)
    if not path.is_file():
        raise SettingsError(f"config file {path} does not exist")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(error, "problem", None) or str(error)
        raise SettingsError(f"{path}: YAML syntax error{where}: {problem}") from None
    if not isinstance(raw, dict):
        raise SettingsError(f"{path}: expected a mapping of runner_settings keys, got {type(raw).__name__}")
    for dotted_key, value in (overrides or {}).items():
        _set_dotted(raw, dotted_key, value)
    return validate_runner_settings(raw, source=str(path))


def validate_runner_settings(raw: dict[str, Any], source: str = "runner_settings") -> dict[str, Any]:
    """Return a complete copy of `raw`: unknown keys, wrong types and impossible combinations raise."""
    settings = _validate_section(SCHEMA, copy.deepcopy(raw), prefix="", source=source)
    _check_parallel_sizes(settings, source)
    return settings


def is_placeholder_path(model_path: str) -> bool:
    return model_path.startswith(PLACEHOLDER_PREFIX)


def _validate_section(section: Section, raw: Any, prefix: str, source: str) -> dict[str, Any]:
    where = prefix.rstrip(".") or "the top level"
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise SettingsError(f"{source}: {where} must be a mapping, got {type(raw).__name__}")
    for key in raw:
        if key not in section.fields:
            close = difflib.get_close_matches(str(key), section.fields, n=1)
            hint = f"; did you mean '{prefix}{close[0]}'?" if close else ""
            allowed = ", ".join(section.fields)
            raise SettingsError(f"{source}: unknown key '{prefix}{key}'{hint} (allowed here: {allowed})")
    result = {}
    for key, spec in section.fields.items():
        name = f"{prefix}{key}"
        if isinstance(spec, Section):
            result[key] = _validate_section(spec, raw.get(key), prefix=f"{name}.", source=source)
            continue
        if key not in raw:
            if spec.required:
                raise SettingsError(f"{source}: missing required key '{name}'")
            result[key] = copy.deepcopy(spec.default)
            continue
        result[key] = _validate_value(spec, raw[key], name, source)
    return result


def _validate_value(spec: Field, value: Any, name: str, source: str) -> Any:
    if value is None and spec.nullable:
        return None
    if spec.kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    wrong_type = not isinstance(value, spec.kind) or (spec.kind in (int, float) and isinstance(value, bool))
    if wrong_type:
        raise SettingsError(
            f"{source}: '{name}' must be {TYPE_NAMES[spec.kind]}, got {value!r} ({type(value).__name__})"
        )
    if spec.item_kind is not None:
        for item in value:
            if not isinstance(item, spec.item_kind) or isinstance(item, bool):
                raise SettingsError(f"{source}: every item of '{name}' must be {TYPE_NAMES[spec.item_kind]}, "
                                    f"got {item!r} ({type(item).__name__})")
    if spec.choices and value not in spec.choices:
        close = difflib.get_close_matches(str(value), [str(choice) for choice in spec.choices], n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise SettingsError(
            f"{source}: '{name}' is {value!r}{hint} (allowed: {', '.join(map(str, spec.choices))})"
        )
    if spec.minimum is not None and value < spec.minimum:
        raise SettingsError(f"{source}: '{name}' must be at least {spec.minimum}, got {value}")
    return value


def _check_parallel_sizes(settings: dict[str, Any], source: str) -> None:
    """Each TP group spans the whole world: ranks of smaller groups would have to split the batch (attention
    data parallelism), which this runtime does not do."""
    world_size = settings["world_size"]
    for key, size in settings["parallel_config"].items():
        if size != world_size:
            raise SettingsError(
                f"{source}: parallel_config.{key} is {size} but world_size is {world_size}: every TP group must "
                f"span all ranks (splitting the batch across groups, attention data parallelism, is not "
                f"supported); set {key}: {world_size}"
            )


def _set_dotted(raw: dict[str, Any], dotted_key: str, value: Any) -> None:
    *parents, leaf = dotted_key.split(".")
    node = raw
    for parent in parents:
        node = node.setdefault(parent, {})
    node[leaf] = value
