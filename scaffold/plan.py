"""Give every weight of a ModelSpec a tensor-parallel role.

Only the classes the causal LM reaches are planned: task heads and vision/audio towers are pruned from the port.
Sources, in order: the per-architecture override file (scaffold/overrides/<model>.yaml), the fused-experts
layout, name rules (q/k/v/gate/up → column, o/down → row, MLA projections, …), the config's `base_model_tp_plan`,
then size rules (a linear fused on disk as `2 * i` / `3 * h` splits per segment; a weight counted in query heads
splits with them). An override naming nothing is an error. A weight none of them covers is replicated (every rank holds it whole: exact at TP=1; at TP>1 the
verification shows whether the model's arithmetic around it still holds) and reported, never silently: one
line on stderr when generating and a list in the port's README.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

import libcst as cst
import libcst.matchers as m
import yaml

from scaffold.errors import ScaffoldError
from scaffold.head_names import QUERY_HEAD_COUNT_NAME
from scaffold.inspect import ModelSpec

logger = logging.getLogger(__name__)

OVERRIDES_DIR = Path(__file__).resolve().parent / "overrides"
ROLES = ("column", "merged_column", "row", "vocab_embedding", "lm_head", "sharded", "summand", "channels",
         "replicated")
GROUPS = ("attn_tp", "moe_tp", "lmhead_tp", "embed_tp")

ATTENTION_CLASS = re.compile(r"Attention")
ROUTER_CLASS = re.compile(r"Router")
FEED_FORWARD_CLASS = re.compile(r"MLP|Experts|MoE|FeedForward|Moe")
# Decoder layers that hold their feed-forward pair directly (OPT, XGLM, BioGPT: self.fc1 / self.fc2).
LAYER_CLASS = re.compile(r"Layer$|Block$")
NORM_CLASS = re.compile(r"Norm")
QUERY = {"q_proj", "query", "q", "q_b_proj"}
KEY_VALUE = {"k_proj", "v_proj", "key", "value", "k", "v"}
# Multi-head latent attention: down-projections to the shared latents (whole on every rank), and the
# up-projection of the kv latent to every head's key and value (split by heads).
LATENT_DOWN = {"q_a_proj", "kv_a_proj_with_mqa"}
LATENT_KEY_VALUE_UP = {"kv_b_proj"}
# Linears fused on disk whose forward chunks the output into equal parts (gate|up; q|k|v of multi-head attention).
FUSED_GATE_UP = {"gate_up_proj"}
FUSED_QKV = {"Wqkv", "qkv_proj"}
ATTENTION_OUT = {"o_proj", "out_proj", "dense", "o"}
FEED_FORWARD_IN = {"gate_proj", "up_proj", "fc1", "w1", "w3", "c_fc", "fc_in", "dense_h_to_4h"}
FEED_FORWARD_OUT = {"down_proj", "fc2", "w2", "c_proj", "fc_out", "dense_4h_to_h"}
LAYER_FEED_FORWARD = {"fc1": "column", "fc2": "row"}
EMBEDDINGS = {"embed_tokens", "wte", "word_embeddings", "embed_in"}
# Learned position embeddings are [max_positions, hidden], not vocabulary-sized: every rank needs every row.
POSITION_EMBEDDINGS = {"wpe", "position_embeddings", "embed_positions"}
LM_HEADS = {"lm_head", "embed_out"}
HF_PLAN_STYLES = {"colwise": "column", "rowwise": "row"}


@dataclass(frozen=True)
class WeightRole:
    role: str
    group: str | None = None
    num_heads: str | None = None
    dim: int | None = None
    source: str = "rule"
    segments: int = 1
    # merged_column: a linear fused on disk (Phi-3's qkv_proj), one output size and head count per segment;
    # channels: a depthwise convolution's channel sections (Gated DeltaNet's q | k | v), likewise.
    output_sizes: tuple[str, ...] = ()
    segment_heads: tuple[str | None, ...] = ()


@dataclass
class TensorParallelPlan:
    roles: dict[tuple[str, str], WeightRole] = field(default_factory=dict)
    reductions: dict[tuple[str, str], str] = field(default_factory=dict)
    # (class, attribute) → the head count it is made of: a size __init__ computes without naming heads (Mamba2's
    # `intermediate_size = expand * hidden_size`) that each rank holds its heads' share of.
    per_rank_sizes: dict[tuple[str, str], str] = field(default_factory=dict)
    # (class, attribute) → a merged layer of that class: a full-size tensor laid out like the layer's output
    # (Falcon-H1's `mup_vector`), read as this rank's columns.
    sliced_like: dict[tuple[str, str], str] = field(default_factory=dict)
    # (class, attribute) of modules built over a per-rank size that act on whole tensors (Falcon-Mamba's
    # weightless dt norm, sized by the channels but applied to the time step x_proj sums over the ranks): kept
    # as the source builds them rather than applied over all heads.
    whole: set[tuple[str, str]] = field(default_factory=set)

    @property
    def replicated_by_default(self) -> list[str]:
        """Every weight ("Class.attribute") no source gave a role, so replicated: what a person should review."""
        return [f"{cls}.{attribute}" for (cls, attribute), role in self.roles.items() if role.source == "default"]

    def role_of(self, class_name: str, attribute: str) -> WeightRole:
        return self.roles[(class_name, attribute)]


def _override_file(spec: ModelSpec) -> Path:
    """Overrides are per architecture (the config's model_type), so a renamed copy of a model finds them too."""
    return OVERRIDES_DIR / f"{spec.model_type}.yaml"


def _load_overrides(spec: ModelSpec) -> tuple[dict, dict, dict, dict, list]:
    path = _override_file(spec)
    if not path.is_file():
        return {}, {}, {}, {}, []
    data = yaml.safe_load(path.read_text()) or {}
    unknown = set(data) - {"weights", "reductions", "per_rank", "sliced_like", "whole"}
    if unknown:
        raise ScaffoldError(f"{path}: unknown sections {sorted(unknown)}; allowed: weights, reductions, per_rank, "
                            f"sliced_like, whole")
    return (data.get("weights") or {}, data.get("reductions") or {}, data.get("per_rank") or {},
            data.get("sliced_like") or {}, data.get("whole") or [])


def _experts_role(class_spec, attribute: str) -> WeightRole | None:
    """HF fused experts: [E, 2I, H] (or [E, H, 2I] when transposed) gate|up — concatenated halves or
    interleaved pairs — and [E, H, I] (or [E, I, H]) down: split the intermediate dim; the down bias is added
    once, since the experts' output is summed over the group."""
    transposed = class_spec.experts_flag("is_transposed", False)
    concatenated = class_spec.experts_flag("is_concatenated", True)
    up_dim, down_dim = (2, 1) if transposed else (1, 2)
    if attribute == "gate_up_proj":
        return WeightRole("sharded", "moe_tp", dim=up_dim, segments=2 if concatenated else 1)
    if attribute == "up_proj":
        return WeightRole("sharded", "moe_tp", dim=up_dim)
    if attribute in ("gate_up_proj_bias", "up_proj_bias"):
        return WeightRole("sharded", "moe_tp", dim=1, segments=2 if concatenated and attribute == "gate_up_proj_bias" else 1)
    if attribute == "down_proj":
        return WeightRole("sharded", "moe_tp", dim=down_dim)
    if attribute == "down_proj_bias":
        return WeightRole("summand", "moe_tp")
    return None


# BERT-style blocks name their projections `dense` and tell them apart by class: the attention's output
# (BertSelfOutput), the feed-forward's input (BertIntermediate) and output (BertOutput).
BERT_DENSE_ROLES = ((re.compile(r"SelfOutput$"), WeightRole("row", "attn_tp", "config.num_attention_heads")),
                    (re.compile(r"Intermediate$"), WeightRole("column", "moe_tp")),
                    (re.compile(r"(?<!Self)Output$"), WeightRole("row", "moe_tp")))


def _rule_role(class_name: str, attribute: str, kind: str, key_value_heads: str) -> WeightRole | None:
    if kind != "linear" and ROUTER_CLASS.search(class_name):
        return WeightRole("replicated")
    if kind == "embedding" and attribute in EMBEDDINGS:
        return WeightRole("vocab_embedding", "embed_tp")
    if kind == "embedding" and attribute in POSITION_EMBEDDINGS:
        return WeightRole("replicated")
    if kind == "linear" and attribute in LM_HEADS:
        return WeightRole("lm_head", "lmhead_tp")
    if kind == "parameter" and NORM_CLASS.search(class_name):
        return WeightRole("replicated")
    if kind != "linear":
        return None
    if ATTENTION_CLASS.search(class_name):
        if attribute in QUERY or attribute in LATENT_KEY_VALUE_UP:
            return WeightRole("column", "attn_tp", "config.num_attention_heads")
        if attribute in LATENT_DOWN:
            return WeightRole("replicated")
        if attribute in KEY_VALUE:
            return WeightRole("column", "attn_tp", key_value_heads)
        if attribute in ATTENTION_OUT:
            return WeightRole("row", "attn_tp", "config.num_attention_heads")
    if FEED_FORWARD_CLASS.search(class_name):
        if attribute in FEED_FORWARD_IN:
            return WeightRole("column", "moe_tp")
        if attribute in FEED_FORWARD_OUT:
            return WeightRole("row", "moe_tp")
    if attribute == "dense":
        role = next((role for pattern, role in BERT_DENSE_ROLES if pattern.search(class_name)), None)
        if role is not None:
            return role
    if LAYER_CLASS.search(class_name) and attribute in LAYER_FEED_FORWARD:
        return WeightRole(LAYER_FEED_FORWARD[attribute], "moe_tp")
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
    if entry["role"] not in ("merged_column", "channels"):
        return WeightRole(entry["role"], entry.get("group"), entry.get("num_heads"), entry.get("dim"), "override")
    sizes, heads = entry.get("output_sizes"), entry.get("num_heads")
    least = 2 if entry["role"] == "merged_column" else 1
    if not isinstance(sizes, list) or len(sizes) < least or not isinstance(heads, list) or len(heads) != len(sizes):
        raise ScaffoldError(f"{where}: {entry['role']} needs output_sizes (one expression per fused segment, at "
                            f"least {least}) and num_heads (the segment's head count, or null to split it evenly) "
                            f"of the same length; got {entry!r}")
    return WeightRole(entry["role"], entry.get("group"), source="override", output_sizes=tuple(sizes),
                      segment_heads=tuple(heads))


def _add_override_roles(plan: TensorParallelPlan, spec: ModelSpec, weights: dict[tuple[str, str], str]) -> None:
    override_weights, override_reductions, per_rank, sliced_like, whole = _load_overrides(spec)
    path = _override_file(spec)
    for key, entry in override_weights.items():
        class_name, _, attribute = key.partition(".")
        if (class_name, attribute) not in weights:
            raise ScaffoldError(f"{path}: '{key}' names no weight the causal LM of {spec.source.display_modeling} "
                                f"builds")
        plan.roles[(class_name, attribute)] = _override_role(entry, f"{path}: '{key}'")
    for key, group in override_reductions.items():
        class_name, _, attribute = key.partition(".")
        if class_name not in spec.classes or group not in GROUPS:
            raise ScaffoldError(f"{path}: reduction '{key}: {group}' names no class of the model or no TP group")
        plan.reductions[(class_name, attribute)] = group
    for key, heads in per_rank.items():
        class_name, _, attribute = key.partition(".")
        if class_name not in spec.classes or not isinstance(heads, str):
            raise ScaffoldError(f"{path}: per_rank '{key}: {heads!r}' needs a class of the model and the config "
                                f"expression of the heads the size is made of (e.g. config.mamba_n_heads)")
        plan.per_rank_sizes[(class_name, attribute)] = heads
    for key, layer in sliced_like.items():
        class_name, _, attribute = key.partition(".")
        role = plan.roles.get((class_name, str(layer)))
        if role is None or role.role != "merged_column":
            raise ScaffoldError(f"{path}: sliced_like '{key}: {layer}' needs a merged_column layer of {class_name}")
        plan.sliced_like[(class_name, attribute)] = layer
    for key in whole:
        class_name, _, attribute = str(key).partition(".")
        if class_name not in spec.classes or not attribute:
            raise ScaffoldError(f"{path}: whole '{key}' needs 'Class.attribute' of a class of the model")
        plan.whole.add((class_name, attribute))


def _add_experts_reductions(plan: TensorParallelPlan, classes: dict) -> None:
    """Each rank's experts hold a slice of the intermediate dim: their caller's result is summed over moe_tp."""
    experts_classes = {name for name, class_spec in classes.items() if class_spec.is_experts}
    for class_name, class_spec in classes.items():
        for attribute, child in class_spec.children.items():
            if child in experts_classes:
                plan.reductions.setdefault((class_name, attribute), "moe_tp")


QUERY_HEADS = m.Attribute(value=m.Name("config"), attr=m.Name("num_attention_heads"))
HEAD_COUNT = QUERY_HEADS | m.Attribute(value=m.Name("self"), attr=QUERY_HEAD_COUNT_NAME) | QUERY_HEAD_COUNT_NAME


def _counts_query_heads(expression: cst.BaseExpression) -> bool:
    """`config.num_attention_heads`, or that times a per-head size."""
    return m.matches(expression, QUERY_HEADS | m.BinaryOperation(left=QUERY_HEADS, operator=m.Multiply()))


def _positional_arguments(arguments: str) -> list[cst.BaseExpression]:
    """The positional arguments of a constructor call, from the argument text inspect recorded."""
    try:
        call = cst.parse_expression(f"f({arguments})")
    except cst.ParserSyntaxError:
        return []
    return [arg.value for arg in call.args if arg.keyword is None]


def _equal_segments(size: cst.BaseExpression, count: int) -> tuple[str, ...] | None:
    """`3 * self.hidden_size` (or `self.hidden_size * 3`) → three `self.hidden_size` segments."""
    if not (isinstance(size, cst.BinaryOperation) and isinstance(size.operator, cst.Multiply)):
        return None
    for factor, segment in ((size.left, size.right), (size.right, size.left)):
        if m.matches(factor, m.Integer(str(count))):
            return (cst.Module([]).code_for_node(segment),) * count
    return None


def _fused_role(class_name: str, attribute: str, kind: str, arguments: str) -> WeightRole | None:
    """A linear fused on disk and chunked equally in forward: `gate_up_proj = nn.Linear(h, 2 * i)` in a feed-forward
    class (GLM, Phi-3), `Wqkv = nn.Linear(h, 3 * h)` in an attention class (MPT). Each segment splits on its own."""
    positional = _positional_arguments(arguments)
    if kind != "linear" or len(positional) < 2:
        return None
    if FEED_FORWARD_CLASS.search(class_name) and attribute in FUSED_GATE_UP:
        segments = _equal_segments(positional[1], 2)
        return WeightRole("merged_column", "moe_tp", output_sizes=segments,
                          segment_heads=(None, None)) if segments else None
    if ATTENTION_CLASS.search(class_name) and attribute in FUSED_QKV:
        segments = _equal_segments(positional[1], 3)
        return WeightRole("merged_column", "attn_tp", output_sizes=segments,
                          segment_heads=("config.num_attention_heads",) * 3) if segments else None
    return None


def _per_head_role(class_name: str, kind: str, arguments: str) -> WeightRole | None:
    """In an attention class, a weight sized by the query heads shards with them: a per-head gate projection
    (`nn.Linear(hidden, config.num_attention_heads * self.head_dim)`, AFMoE) is column-parallel by heads, a
    per-head parameter (`nn.Parameter(torch.zeros(config.num_attention_heads))`, attention sinks) is split on its
    first dim."""
    if not ATTENTION_CLASS.search(class_name):
        return None
    positional = _positional_arguments(arguments)
    if kind == "linear" and len(positional) >= 2 and _counts_query_heads(positional[1]):
        return WeightRole("column", "attn_tp", "config.num_attention_heads")
    if kind == "parameter" and positional and m.matches(positional[0], m.Call()) and positional[0].args:
        first = positional[0].args[0].value
        first = first.elements[0].value if isinstance(first, (cst.Tuple, cst.List)) and first.elements else first
        if m.matches(first, HEAD_COUNT):
            return WeightRole("sharded", "attn_tp", dim=0)
    return None


def _derived_role(spec: ModelSpec, class_name: str, attribute: str, kind: str,
                  hf_roles: dict[str, str]) -> WeightRole:
    """Experts layout, then name rules, then the config's base_model_tp_plan, then sizes counted in query heads;
    otherwise replicated."""
    class_spec = spec.classes[class_name]
    role = _experts_role(class_spec, attribute) if class_spec.is_experts and kind == "parameter" else None
    role = role or _rule_role(class_name, attribute, kind, spec.key_value_heads)
    if role is None and attribute in hf_roles and kind == "linear":
        group = "attn_tp" if ATTENTION_CLASS.search(class_name) else "moe_tp"
        role = WeightRole(hf_roles[attribute], group, source="base_model_tp_plan")
    if role is None:
        arguments = next(weight.arguments for weight in class_spec.weights if weight.attribute == attribute)
        role = _fused_role(class_name, attribute, kind, arguments) or _per_head_role(class_name, kind, arguments)
    return role or WeightRole("replicated", source="default")


def _output_embedding_roles(spec: ModelSpec, classes: dict) -> dict[tuple[str, str], WeightRole]:
    """The linear the causal LM's `get_output_embeddings` returns is its LM head, whatever it is called (BERT's
    `cls.predictions.decoder`, RoBERTa's `lm_head.decoder`); a vocabulary-sized bias beside it (tied to the
    head's) splits with the vocabulary."""
    owner, path = spec.causal_lm_class, spec.classes[spec.causal_lm_class].output_embeddings
    for attribute in path[:-1]:
        owner = spec.classes[owner].children.get(attribute) if owner in spec.classes else None
    if not path or owner not in classes:
        return {}
    roles = {}
    for weight in classes[owner].weights:
        if weight.attribute == path[-1] and weight.kind == "linear":
            roles[(owner, weight.attribute)] = WeightRole("lm_head", "lmhead_tp")
        elif weight.kind == "parameter" and re.fullmatch(r"torch\.\w+\(config\.vocab_size\)", weight.arguments):
            roles[(owner, weight.attribute)] = WeightRole("sharded", "lmhead_tp", dim=0)
    return roles if any(role.role == "lm_head" for role in roles.values()) else {}


def _input_embedding_roles(classes: dict) -> dict[tuple[str, str], WeightRole]:
    """The embedding a model's `get_input_embeddings` returns is its vocabulary, whatever it is called."""
    return {(name, spec.input_embeddings[0]): WeightRole("vocab_embedding", "embed_tp")
            for name, spec in classes.items() if len(spec.input_embeddings) == 1
            and any(weight.attribute == spec.input_embeddings[0] and weight.kind == "embedding"
                    for weight in spec.weights)}


def plan_tensor_parallel(spec: ModelSpec) -> TensorParallelPlan:
    classes = spec.causal_lm_classes()
    weights = {
        (class_name, weight.attribute): weight.kind
        for class_name, class_spec in classes.items()
        for weight in class_spec.weights
    }
    plan = TensorParallelPlan()
    _add_override_roles(plan, spec, weights)
    _add_experts_reductions(plan, classes)
    hf_roles = _hf_plan_roles(spec)
    for key, role in {**_input_embedding_roles(classes), **_output_embedding_roles(spec, classes)}.items():
        plan.roles.setdefault(key, role)
    for (class_name, attribute), kind in weights.items():
        if (class_name, attribute) not in plan.roles:
            plan.roles[(class_name, attribute)] = _derived_role(spec, class_name, attribute, kind, hf_roles)
    if plan.replicated_by_default:
        logger.warning("%s: replicated on every rank (no override, base_model_tp_plan entry or name rule gives a "
                       "role; check the TP>1 verification, or give one in %s): %s", spec.source.name,
                       _override_file(spec), ", ".join(plan.replicated_by_default))
    return plan
