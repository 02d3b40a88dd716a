"""Parse a model's source with libcst (never importing it) into a ModelSpec: classes, weights, roles."""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass, field

import libcst as cst
import libcst.matchers as m

from scaffold.errors import ScaffoldError
from scaffold.locate import ModelSource

# Conv1D (GPT-2's transposed linear) is recorded so that the planner reports it: the parallel layers cannot split
# its [in, out] weight, so it is replicated.
# How causal-LM classes end: GPT2LMHeadModel, XLMWithLMHeadModel, ReformerModelWithLMHead, BertGenerationDecoder.
CAUSAL_LM_SUFFIX = re.compile(r"(ForCausalLM|(Model)?WithLMHead(Model)?|LMHeadModel|Decoder)$")
WEIGHT_CONSTRUCTORS = {"Linear": "linear", "Embedding": "embedding", "Parameter": "parameter", "Conv1D": "conv1d",
                       "Conv1d": "conv"}


@dataclass(frozen=True)
class WeightSpec:
    attribute: str
    kind: str
    arguments: str


@dataclass
class ClassSpec:
    name: str
    bases: list[str]
    init_params: list[str] = field(default_factory=list)
    constructs: list[str] = field(default_factory=list)
    weights: list[WeightSpec] = field(default_factory=list)
    forward_params: list[str] = field(default_factory=list)
    forward_annotations: dict[str, str] = field(default_factory=dict)
    children: dict[str, str] = field(default_factory=dict)
    decorators: dict[str, dict[str, str]] = field(default_factory=dict)
    config_annotation: str | None = None
    # What `get_output_embeddings` returns, as attributes from self: ("lm_head", "decoder") for BERT-style heads.
    output_embeddings: tuple[str, ...] = ()
    input_embeddings: tuple[str, ...] = ()  # likewise for `get_input_embeddings` (Mamba's `embeddings`, CTRL's `w`)

    @property
    def is_experts(self) -> bool:
        """HF's fused-experts modules carry @use_experts_implementation (3-D gate_up_proj / down_proj)."""
        return "use_experts_implementation" in self.decorators

    def experts_flag(self, name: str, default: bool) -> bool:
        value = self.decorators.get("use_experts_implementation", {}).get(name)
        return default if value is None else value == "True"

    @property
    def takes_config(self) -> bool:
        return "config" in self.init_params


@dataclass
class ModelSpec:
    source: ModelSource
    modeling: cst.Module
    classes: dict[str, ClassSpec]
    causal_lm_class: str
    config_class: str
    model_type: str
    base_model_tp_plan: dict | None
    reachable: frozenset[str] = frozenset()
    config_attributes: frozenset[str] = frozenset()

    @property
    def key_value_heads(self) -> str:
        """The config expression of the KV head count: multi-head configs without GQA have no num_key_value_heads."""
        if "num_key_value_heads" in self.config_attributes:
            return "config.num_key_value_heads"
        return "config.num_attention_heads"

    @property
    def has_grouped_kv_heads(self) -> bool:
        """The config sets the KV head count on its own (GQA/MQA); latent attention (DeepSeek's kv_lora_rank)
        expands its KV latent to every query head instead."""
        return "num_key_value_heads" in self.config_attributes and "kv_lora_rank" not in self.config_attributes

    @property
    def camel_name(self) -> str:
        return CAUSAL_LM_SUFFIX.sub("", self.causal_lm_class) or self.causal_lm_class

    def classes_taking_config(self) -> list[str]:
        return [name for name, spec in self.classes.items() if spec.takes_config]

    def causal_lm_classes(self) -> dict[str, ClassSpec]:
        """The classes the causal LM reaches, in file order: what the port keeps (task heads, vision and audio
        towers the causal LM never builds are pruned, so they need no tensor-parallel plan)."""
        return {name: spec for name, spec in self.classes.items() if name in self.reachable}


def constructed_call(value: cst.BaseExpression) -> cst.Call | None:
    """The constructor call an attribute is assigned: `X(...)`, or an optional one, `X(...) if c else None`
    (DeepSeek's q_a_proj exists only with a q_lora_rank)."""
    if isinstance(value, cst.Call):
        return value
    if isinstance(value, cst.IfExp):
        branches = [value.body, value.orelse]
        calls = [branch for branch in branches if isinstance(branch, cst.Call)]
        if len(calls) == 1 and any(m.matches(branch, m.Name("None")) for branch in branches):
            return calls[0]
    return None


def _dotted(node: cst.BaseExpression) -> str:
    if isinstance(node, cst.Name):
        return node.value
    if isinstance(node, cst.Attribute):
        return f"{_dotted(node.value)}.{node.attr.value}"
    return cst.Module([]).code_for_node(node)


class _ClassCollector(cst.CSTVisitor):
    def __init__(self, module: cst.Module):
        self.module = module
        self.classes: dict[str, ClassSpec] = {}
        self._class_stack: list[ClassSpec] = []
        self._method: str | None = None

    def visit_ClassDef(self, node: cst.ClassDef) -> None:
        spec = ClassSpec(node.name.value, [_dotted(base.value) for base in node.bases])
        for decorator in node.decorators:
            target = decorator.decorator
            call = target if isinstance(target, cst.Call) else None
            name = _dotted(call.func if call else target).split(".")[-1]
            spec.decorators[name] = {
                arg.keyword.value: self.module.code_for_node(arg.value) for arg in (call.args if call else ())
                if arg.keyword is not None
            }
        if not self._class_stack:
            self.classes[spec.name] = spec
        self._class_stack.append(spec)

    def leave_ClassDef(self, original_node: cst.ClassDef) -> None:
        self._class_stack.pop()

    def visit_FunctionDef(self, node: cst.FunctionDef) -> None:
        if not self._class_stack or self._method is not None:
            return
        self._method = node.name.value
        params = [param.name.value for param in node.params.params][1:]
        params += [param.name.value for param in node.params.kwonly_params]
        if self._method == "__init__":
            self._class_stack[-1].init_params = params
            config = next((param for param in node.params.params if param.name.value == "config"), None)
            if config is not None and config.annotation is not None:
                self._class_stack[-1].config_annotation = _dotted(config.annotation.annotation)
        elif self._method in ("get_output_embeddings", "get_input_embeddings"):
            returned = m.findall(node, m.Return(value=m.Attribute()))
            path = _dotted(returned[0].value).split(".") if len(returned) == 1 else []
            if path[:1] == ["self"] and len(path) > 1:
                setattr(self._class_stack[-1], self._method.removeprefix("get_"), tuple(path[1:]))
        elif self._method == "forward":
            self._class_stack[-1].forward_params = params
            self._class_stack[-1].forward_annotations = {
                param.name.value: self.module.code_for_node(param.annotation.annotation)
                for param in (*node.params.params, *node.params.kwonly_params) if param.annotation is not None
            }

    def leave_FunctionDef(self, original_node: cst.FunctionDef) -> None:
        if self._class_stack and self._method == original_node.name.value:
            self._method = None

    def visit_Assign(self, node: cst.Assign) -> None:
        call = constructed_call(node.value)
        if not self._class_stack or self._method != "__init__" or call is None:
            return
        target = node.targets[0].target
        constructor = _dotted(call.func).split(".")[-1]
        if m.matches(target, m.Attribute(value=m.Name("self"))) and isinstance(call.func, cst.Name):
            self._class_stack[-1].children[target.attr.value] = constructor
        if m.matches(target, m.Attribute(value=m.Name("self"))) and constructor in WEIGHT_CONSTRUCTORS:
            arguments = self.module.code_for_node(call).split("(", 1)[1].rsplit(")", 1)[0]
            self._class_stack[-1].weights.append(
                WeightSpec(target.attr.value, WEIGHT_CONSTRUCTORS[constructor], " ".join(arguments.split()))
            )

    def visit_Call(self, node: cst.Call) -> None:
        if self._class_stack and self._method == "__init__" and isinstance(node.func, cst.Name):
            self._class_stack[-1].constructs.append(node.func.value)


class _NameCollector(cst.CSTVisitor):
    def __init__(self):
        super().__init__()
        self.names: set[str] = set()

    def visit_Name(self, node: cst.Name) -> None:
        self.names.add(node.value)


def names_used(node: cst.CSTNode) -> set[str]:
    collector = _NameCollector()
    node.visit(collector)
    return collector.names


def defined_name(statement: cst.CSTNode) -> str | None:
    if isinstance(statement, (cst.ClassDef, cst.FunctionDef)):
        return statement.name.value
    return None


def _module_level_uses(module: cst.Module) -> set[str]:
    """Names that top-level statements other than definitions and imports use, e.g. the classes in
    `ATTENTION_CLASSES = {"eager": FalconAttention, ...}`: such statements are kept, so what they name is too."""
    imports = m.SimpleStatementLine(body=[m.Import() | m.ImportFrom()])
    return set().union(*(names_used(statement) for statement in module.body
                         if defined_name(statement) is None and not m.matches(statement, imports)))


def reachable_definitions(module: cst.Module, root: str) -> set[str]:
    """The top-level classes and functions `root` and the module-level statements use, directly or through each
    other (by name)."""
    definitions = {name: statement for statement in module.body if (name := defined_name(statement)) is not None}
    reachable, frontier = set(), [root, *_module_level_uses(module)]
    while frontier:
        name = frontier.pop()
        if name in reachable or name not in definitions:
            continue
        reachable.add(name)
        frontier.extend(names_used(definitions[name]) & definitions.keys())
    return reachable


def _literal_or_none(code: str):
    """A plan written as a literal; one built by code (comprehensions, ** unpacking) is left out: it is only one
    input of the planner, and its name rules still apply."""
    try:
        return ast.literal_eval(code)
    except (ValueError, SyntaxError):
        return None


def _config_classes(configuration: cst.Module) -> list[tuple[str, str, dict | None, frozenset[str]]]:
    """(class name, model_type, base_model_tp_plan, attribute names incl. attribute_map aliases) of every config
    class that sets a `model_type`, in file order."""
    found = []
    for statement in configuration.body:
        if not isinstance(statement, cst.ClassDef):
            continue
        model_type, tp_plan, attributes = None, None, set()
        for item in statement.body.body:
            if not m.matches(item, m.SimpleStatementLine(body=[m.Assign() | m.AnnAssign()])):
                continue
            assign = item.body[0]
            target = assign.targets[0].target if isinstance(assign, cst.Assign) else assign.target
            if not isinstance(target, cst.Name) or assign.value is None:
                continue
            value_code = configuration.code_for_node(assign.value)
            attributes.add(target.value)
            if target.value == "attribute_map":
                attributes.update(_literal_or_none(value_code) or {})
            if target.value == "model_type":
                model_type = ast.literal_eval(value_code)
            elif target.value == "base_model_tp_plan":
                tp_plan = _literal_or_none(value_code)
        if model_type is not None:
            found.append((statement.name.value, model_type, tp_plan, frozenset(attributes)))
    return found


def _config_class_and_type(configuration: cst.Module, path, annotation: str | None) -> tuple:
    """The config class the causal LM's `__init__(self, config: X)` names (a file may define several: Gemma3's
    text and multimodal configs), else the file's first."""
    found = _config_classes(configuration)
    if not found:
        raise ScaffoldError(f"{path} defines no config class with a `model_type` attribute")
    return next((entry for entry in found if entry[0] == annotation), found[0])


def _parse(path) -> cst.Module:
    try:
        return cst.parse_module(path.read_text(encoding="utf-8"))
    except cst.ParserSyntaxError as error:
        raise ScaffoldError(f"{path} is not valid Python: syntax error at line {error.raw_line}, "
                            f"column {error.raw_column}") from None
    except UnicodeDecodeError as error:
        raise ScaffoldError(f"{path} is not UTF-8 text: {error}") from None


def inspect_model(source: ModelSource) -> ModelSpec:
    modeling = _parse(source.modeling_path)
    configuration = _parse(source.configuration_path)
    collector = _ClassCollector(modeling)
    modeling.visit(collector)
    causal_lms = [name for name in collector.classes if name.endswith("ForCausalLM")]
    if len(causal_lms) != 1 and source.causal_lm_class in collector.classes:
        # No single *ForCausalLM: the class the auto mapping names (GPT2LMHeadModel, BertLMHeadModel, …). A
        # multimodal file's *ForCausalLM is its text tower, preferred to the composite model the mapping names.
        causal_lms = [source.causal_lm_class]
    if len(causal_lms) != 1:
        found = ", ".join(causal_lms) or "none"
        raise ScaffoldError(
            f"{source.display_modeling} must define exactly one *ForCausalLM class to port (found: {found}); "
            f"encoder-decoder and encoder-only models are not decoder LMs"
        )
    config_class, model_type, tp_plan, config_attributes = _config_class_and_type(
        configuration, source.configuration_path, collector.classes[causal_lms[0]].config_annotation
    )
    reachable = frozenset(reachable_definitions(modeling, causal_lms[0]))
    return ModelSpec(source, modeling, collector.classes, causal_lms[0], config_class, model_type, tp_plan, reachable,
                     config_attributes)
