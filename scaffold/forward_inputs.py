"""Which arguments of the causal LM's `forward` the port's `prepare_inputs_for_generation` fills, found by role.

The runner's input dict (`input_ids`, `attention_mask`, `position_ids`, `cache_position`, `kv_cache`) is the
runtime's own contract; this maps it onto the forward's parameters. The cache parameter is found by what it is —
annotated as a `Cache`, or used as one (`.get_seq_length()`) — not by its name, which transformers renames between
releases (5.24 renamed `past_key_values`, and state-space models' `cache_params`, to `cache`).
"""

from __future__ import annotations

import re

import libcst as cst
import libcst.matchers as m

from scaffold.errors import UnsupportedConstruct
from scaffold.inspect import ModelSpec

CACHE_ROLE = "kv_cache"
# Names the `generate()` contract has kept since transformers 4: the port relies on them as HF's own generation does.
REQUIRED_INPUTS = ("input_ids", "attention_mask")
# The runner's values for each forward input, in the order the port passes them.
INPUT_EXPRESSIONS = {
    "input_ids": "input_ids",
    "attention_mask": "masks_for_model(self.config, attention_mask, cache_position, self.dtype)",
    "position_ids": "position_ids",
    CACHE_ROLE: CACHE_ROLE,
    "use_cache": "True",
    "logits_to_keep": "1",
}
IMPORTS = (("core.attention_mask", "masks_for_model"),)
CACHE_TYPE = re.compile(r"\b\w*Cache\b")
# Methods only a transformers Cache has: a parameter they are called on is the cache, whatever its annotation.
CACHE_METHODS = ("get_seq_length", "get_mask_sizes")


def forward_inputs(spec: ModelSpec) -> list[tuple[str, str]]:
    """(forward parameter, expression over the runner's input dict) for every input the port passes."""
    params = spec.classes[spec.causal_lm_class].forward_params
    for name in REQUIRED_INPUTS:
        if name not in params:
            raise _unsupported(spec, "forward inputs", f"{spec.causal_lm_class}.forward without a `{name}` parameter")
    by_role = {name: name for name in INPUT_EXPRESSIONS if name in params}
    by_role[CACHE_ROLE] = cache_parameter(spec)
    return [(by_role[role], expression) for role, expression in INPUT_EXPRESSIONS.items() if role in by_role]


def cache_parameter(spec: ModelSpec) -> str:
    """The causal LM forward's cache parameter: the one annotated with a Cache type, else the one some forward in
    the file calls a Cache-only method on."""
    causal_lm = spec.classes[spec.causal_lm_class]
    annotated = [name for name, annotation in causal_lm.forward_annotations.items() if CACHE_TYPE.search(annotation)]
    if len(annotated) == 1:
        return annotated[0]
    if not annotated:
        used = _cache_method_receivers(spec.modeling) & set(causal_lm.forward_params)
        if len(used) == 1:
            return used.pop()
    candidates = ", ".join(annotated) or "none annotated `Cache` or used as one"
    raise _unsupported(spec, "cache argument",
                       f"{spec.causal_lm_class}.forward's cache parameter (candidates: {candidates})")


def _cache_method_receivers(module: cst.Module) -> set[str]:
    calls = m.findall(module, m.Call(func=m.Attribute(value=m.Name(), attr=m.OneOf(*map(m.Name, CACHE_METHODS)))))
    return {call.func.value.value for call in calls}


def _unsupported(spec: ModelSpec, rule: str, construct: str) -> UnsupportedConstruct:
    return UnsupportedConstruct(rule, construct, spec.source.display_modeling, spec.source.transformers_version)
