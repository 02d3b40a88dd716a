"""Give every weight of a ModelSpec a tensor-parallel role.

Sources, in order: the per-architecture override file (scaffold/overrides/<model>.yaml), the config's
`base_model_tp_plan`, then name rules (q/k/v/gate/up → column, o/down → row, …). An override naming nothing,
or a weight left without a role, is an error: never a silent replication.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from scaffold.errors import ScaffoldError
from scaffold.inspect import ModelSpec

OVERRIDES_DIR = Path(__file__).resolve().parent / "overrides"
ROLES = ("column", "row", "vocab_embedding", "lm_head", "sharded", "summand", "replicated")
GROUPS = ("attn_tp", "moe_tp", "lmhead_tp", "embed_tp")

ATTENTION_CLASS = re.compile(r"Attention")
FEED_FORWARD_CLASS = re.compile(r"MLP|Experts|MoE|FeedForward|Moe")
NORM_CLASS = re.compile(r"Norm")
QUERY = {"q_proj", "query", "q"}
KEY_VALUE = {"k_proj", "v_proj", "key", "value", "k", "v"}
ATTENTION_OUT = {"o_proj", "out_proj", "dense", "o"}
FEED_FORWARD_IN = {"gate_proj", "up_proj", "fc1", "w1", "w3", "c_fc"}
FEED_FORWARD_OUT = {"down_proj", "fc2", "w2", "c_proj"}
EMBEDDINGS = {"embed_tokens", "wte", "word_embeddings"}
HF_PLAN_STYLES = {"colwise": "column", "rowwise": "row"}


@dataclass(frozen=True)
class WeightRole:
    role: str
    group: str | None = None
    num_heads: str | None = None
    dim: int | None = None
    source: str = "rule"


@dataclass
class TensorParallelPlan:
    roles: dict[tuple[str, str], WeightRole] = field(default_factory=dict)
    reductions: dict[tuple[str, str], str] = field(default_factory=dict)

    def role_of(self, class_name: str, attribute: str) -> WeightRole:
        return self.roles[(class_name, attribute)]


def _override_file(spec: ModelSpec) -> Path:
    """Overrides are per architecture (the config's model_type), so a renamed copy of a model finds them too."""
    return OVERRIDES_DIR / f"{spec.model_type}.yaml"


def _load_overrides(spec: ModelSpec) -> tuple[dict, dict]:
    path = _override_file(spec)
    if not path.is_file():
        return {}, {}
    data = yaml.safe_load(path.read_text()) or {}
    unknown = set(data) - {"weights", "reductions"}
    if unknown:
        raise ScaffoldError(f"{path}: unknown sections {sorted(unknown)}; allowed: weights, reductions")
    return data.get("weights") or {}, data.get("reductions") or {}


def _rule_role(class_name: str, attribute: str, kind: str) -> WeightRole | None:
    if kind == "embedding" and attribute in EMBEDDINGS:
        return WeightRole("vocab_embedding", "embed_tp")
    if kind == "linear" and attribute == "lm_head":
        return WeightRole("lm_head", "lmhead_tp")
    if kind == "parameter" and NORM_CLASS.search(class_name):
        return WeightRole("replicated")
    if kind != "linear":
        return None
    if ATTENTION_CLASS.search(class_name):
        if attribute in QUERY:
            return WeightRole("column", "attn_tp", "config.num_attention_heads")
        if attribute in KEY_VALUE:
            return WeightRole("column", "attn_tp", "config.num_key_value_heads")
        if attribute in ATTENTION_OUT:
            return WeightRole("row", "attn_tp", "config.num_attention_heads")
    if FEED_FORWARD_CLASS.search(class_name):
        if attribute in FEED_FORWARD_IN:
            return WeightRole("column", "moe_tp")
        if attribute in FEED_FORWARD_OUT:
            return WeightRole("row", "moe_tp")
    return None


def _hf_plan_roles(spec: ModelSpec) -> dict[str, str]:
    """attribute name → role from the config's base_model_tp_plan (e.g. "layers.*.self_attn.q_proj": "colwise")."""
    roles = {}
    for path, style in (spec.base_model_tp_plan or {}).items():
        if style in HF_PLAN_STYLES:
            roles[path.split(".")[-1]] = HF_PLAN_STYLES[style]
    return roles


def _override_role(entry: dict, where: str) -> WeightRole:
    if not isinstance(entry, dict) or entry.get("role") not in ROLES:
        raise ScaffoldError(f"{where}: each entry needs a role, one of {', '.join(ROLES)}; got {entry!r}")
    if entry.get("group") is not None and entry["group"] not in GROUPS:
        raise ScaffoldError(f"{where}: group {entry['group']!r} is not one of {', '.join(GROUPS)}")
    return WeightRole(entry["role"], entry.get("group"), entry.get("num_heads"), entry.get("dim"), "override")


def plan_tensor_parallel(spec: ModelSpec) -> TensorParallelPlan:
    override_weights, override_reductions = _load_overrides(spec)
    path = _override_file(spec)
    weights = {
        (class_name, weight.attribute): weight.kind
        for class_name, class_spec in spec.classes.items()
        for weight in class_spec.weights
    }
    plan = TensorParallelPlan()
    for key, entry in override_weights.items():
        class_name, _, attribute = key.partition(".")
        if (class_name, attribute) not in weights:
            raise ScaffoldError(f"{path}: '{key}' names no weight of {spec.source.display_modeling}")
        plan.roles[(class_name, attribute)] = _override_role(entry, f"{path}: '{key}'")
    for key, group in override_reductions.items():
        class_name, _, attribute = key.partition(".")
        if class_name not in spec.classes or group not in GROUPS:
            raise ScaffoldError(f"{path}: reduction '{key}: {group}' names no class of the model or no TP group")
        plan.reductions[(class_name, attribute)] = group
    hf_roles = _hf_plan_roles(spec)
    unplanned = []
    for (class_name, attribute), kind in weights.items():
        if (class_name, attribute) in plan.roles:
            continue
        role = _rule_role(class_name, attribute, kind)
        if role is None and attribute in hf_roles and kind == "linear":
            group = "attn_tp" if ATTENTION_CLASS.search(class_name) else "moe_tp"
            role = WeightRole(hf_roles[attribute], group, source="base_model_tp_plan")
        if role is None:
            unplanned.append(f"{class_name}.{attribute} ({kind})")
        else:
            plan.roles[(class_name, attribute)] = role
    if unplanned:
        raise ScaffoldError(
            f"no tensor-parallel role for {', '.join(unplanned)}; give each one in {path} "
            f"(roles: {', '.join(ROLES)})"
        )
    return plan
