"""libcst codemods that turn an HF modeling file into a runner_settings-aware port.

Each transformation is one `CodemodCommand`; `port_modeling_module` runs them in order. They walk the tree with
plain `CSTTransformer`s (not matcher-decorated ones) or only the top-level statements: the generator must
stay well under a few seconds per model.
"""

from __future__ import annotations

import re

import libcst as cst
import libcst.matchers as m
from libcst.codemod import CodemodCommand, CodemodContext

from scaffold.errors import ScaffoldError
from scaffold.head_names import HEAD_COUNT_NAME, HEAD_COUNTS, HEAD_SIZES, PER_RANK_HEAD_COUNTS
from scaffold.inspect import ModelSpec, constructed_call, defined_name, names_used, reachable_definitions
from scaffold.merge_linears import MERGED_LAYER, merge_sibling_linears
from scaffold.plan import NORM_CLASS, TensorParallelPlan, WeightRole

SETTINGS = "runner_settings"
MODULAR_BANNER_MARK = "automatically generated from"


class AbsoluteImportsCommand(CodemodCommand):
    """`from ...cache_utils import X` → `from transformers.cache_utils import X`: the port lives outside HF."""

    DESCRIPTION = "Resolve relative imports against the source package."

    def __init__(self, context: CodemodContext, package: str):
        super().__init__(context)
        self.package = package

    def transform_module_impl(self, tree: cst.Module) -> cst.Module:
        return tree.visit(_AbsoluteImports(self.package))


class _AbsoluteImports(cst.CSTTransformer):
    def __init__(self, package: str):
        super().__init__()
        self.package_parts = package.split(".")

    def leave_ImportFrom(self, original_node: cst.ImportFrom, updated_node: cst.ImportFrom) -> cst.ImportFrom:
        depth = len(updated_node.relative)
        if depth == 0:
            return updated_node
        base = self.package_parts[: len(self.package_parts) - (depth - 1)]
        if updated_node.module is not None:
            base = base + cst.Module([]).code_for_node(updated_node.module).split(".")
        return updated_node.with_changes(relative=[], module=cst.parse_expression(".".join(base)))


class PruneToCausalLMCommand(CodemodCommand):
    """Keep only the classes and functions the causal LM reaches; drop heads (sequence classification, …)
    and the imports nothing uses any more, and list what is left in `__all__`."""

    DESCRIPTION = "Remove definitions the causal LM does not use."

    def __init__(self, context: CodemodContext, root: str):
        super().__init__(context)
        self.root = root

    def transform_module_impl(self, updated_node: cst.Module) -> cst.Module:
        reachable = reachable_definitions(updated_node, self.root)
        kept = [
            statement
            for statement in updated_node.body
            if defined_name(statement) is None or defined_name(statement) in reachable
        ]
        kept = [self._prune_all(statement, reachable) for statement in kept]
        imports = m.SimpleStatementLine(body=[m.Import() | m.ImportFrom()])
        used = set().union(*(names_used(statement) for statement in kept if not m.matches(statement, imports)))
        return updated_node.with_changes(body=[s for s in (self._drop_unused(s, used) for s in kept) if s])

    @staticmethod
    def _prune_all(statement: cst.CSTNode, reachable: set[str]) -> cst.CSTNode:
        """Keep the `__all__` entries whose definitions survive, one per line."""
        all_assign = m.SimpleStatementLine(body=[m.Assign(targets=[m.AssignTarget(m.Name("__all__"))])])
        if not m.matches(statement, all_assign):
            return statement
        names = [
            element.value.evaluated_value for element in statement.body[0].value.elements
            if isinstance(element.value, cst.SimpleString) and element.value.evaluated_value in reachable
        ]
        lines = "".join(f'    "{name}",\n' for name in names)
        return cst.parse_statement(f"__all__ = [\n{lines}]\n")

    @staticmethod
    def _drop_unused(statement: cst.CSTNode, used: set[str]) -> cst.CSTNode | None:
        if not m.matches(statement, m.SimpleStatementLine(body=[m.Import() | m.ImportFrom()])):
            return statement
        node = statement.body[0]
        if isinstance(node.names, cst.ImportStar):
            return statement
        aliases = [
            alias for alias in node.names
            if (alias.asname.name.value if alias.asname else _bound_name(alias)) in used
        ]
        if not aliases:
            return None
        aliases[-1] = aliases[-1].with_changes(comma=cst.MaybeSentinel.DEFAULT)
        changes = {"names": aliases}
        if isinstance(node, cst.ImportFrom) and len(aliases) == 1:
            changes.update(lpar=None, rpar=None)
        return statement.with_changes(body=[node.with_changes(**changes)])


def _bound_name(alias: cst.ImportAlias) -> str:
    return cst.Module([]).code_for_node(alias.name).split(".")[0]


class ThreadRunnerSettingsCommand(CodemodCommand):
    """Every module constructor that takes `config` also takes `runner_settings` (right after `config`),
    keeps it as `self.runner_settings`, and passes it on to every such module it builds."""

    DESCRIPTION = "Thread runner_settings through module constructors."

    def __init__(self, context: CodemodContext, spec: ModelSpec):
        super().__init__(context)
        self.spec = spec

    def transform_module_impl(self, tree: cst.Module) -> cst.Module:
        return tree.visit(_ThreadRunnerSettings(self.spec))


def _constructor_class(spec: ModelSpec, name: str) -> str:
    """The class whose `__init__` builds `name`: itself, or the base it inherits `__init__` from."""
    bases = spec.classes[name].bases
    while not spec.classes[name].init_params and bases and bases[0] in spec.classes:
        name = bases[0]
        bases = spec.classes[name].bases
    return name


def _class_tables(spec: ModelSpec, threaded: set[str]) -> dict[str, str]:
    """Module-level dicts of threaded classes, e.g. `ATTENTION_CLASSES = {"eager": FalconAttention, ...}`, whose
    entries are built as `ATTENTION_CLASSES[implementation](config, layer_idx)`: table name → the class whose
    `__init__` they share."""
    tables = {}
    module = spec.modeling
    table = m.SimpleStatementLine(body=[m.Assign(targets=[m.AssignTarget(m.Name())], value=m.Dict())])
    for statement in module.body:
        if not m.matches(statement, table):
            continue
        values = [element.value for element in statement.body[0].value.elements if isinstance(element, cst.DictElement)]
        if not values or not all(isinstance(value, cst.Name) and value.value in spec.classes for value in values):
            continue
        constructors = sorted({_constructor_class(spec, value.value) for value in values})
        # Several classes may share a table (Jamba's attention and Mamba layers) when `config` sits at the same
        # position in each constructor: runner_settings goes right after it whichever is built.
        if (set(constructors) <= threaded
                and len({spec.classes[name].init_params.index("config") for name in constructors}) == 1):
            tables[statement.body[0].targets[0].target.value] = constructors[0]
    return tables


class _ThreadRunnerSettings(cst.CSTTransformer):
    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.spec = spec
        self.threaded = set(spec.classes_taking_config())
        self.class_tables = _class_tables(spec, self.threaded)
        self._class_stack: list[str] = []
        self._function_stack: list[str] = []
        # Local names of the current function bound to a threaded class:
        # `attention_class = CrossAttention if is_cross_attention else SelfAttention` (BERT/RoBERTa).
        self._class_aliases: dict[str, str] = {}

    def visit_ClassDef(self, node: cst.ClassDef) -> None:
        self._class_stack.append(node.name.value)

    def leave_ClassDef(self, original_node: cst.ClassDef, updated_node: cst.ClassDef) -> cst.ClassDef:
        self._class_stack.pop()
        return updated_node

    def visit_FunctionDef(self, node: cst.FunctionDef) -> None:
        self._function_stack.append(node.name.value)
        self._class_aliases = {}

    def visit_Assign(self, node: cst.Assign) -> None:
        if len(node.targets) != 1 or not isinstance(node.targets[0].target, cst.Name):
            return
        value = node.value
        if m.matches(value, m.Subscript(value=m.Name())) and value.value.value in self.class_tables:
            # `layer_class = ALL_DECODER_LAYER_TYPES[config.layers_block_type[i]]` (Jamba)
            self._class_aliases[node.targets[0].target.value] = self.class_tables[value.value.value]
            return
        choices = [value.body, value.orelse] if isinstance(value, cst.IfExp) else [value]
        # `BambaMLP if num_experts == 1 else None`: only a class can be called.
        choices = [choice for choice in choices if not m.matches(choice, m.Name("None"))]
        if not choices or not all(isinstance(choice, cst.Name) and choice.value in self.threaded for choice in choices):
            return
        constructors = [_constructor_class(self.spec, choice.value) for choice in choices]
        # Either class may be built: the call passes runner_settings right after config, so config must sit at the
        # same position in both.
        if len({self.spec.classes[name].init_params.index("config") for name in constructors}) == 1:
            self._class_aliases[node.targets[0].target.value] = constructors[0]

    def leave_FunctionDef(self, original_node: cst.FunctionDef, updated_node: cst.FunctionDef) -> cst.FunctionDef:
        self._function_stack.pop()
        if not self._in_threaded_init(original_node):
            return updated_node
        params = list(updated_node.params.params)
        config_index = [param.name.value for param in params].index("config")
        default = cst.Name("None") if params[config_index].default is not None else None
        params.insert(config_index + 1, cst.Param(cst.Name(SETTINGS), default=default,
                                                 equal=cst.AssignEqual(cst.SimpleWhitespace(""),
                                                                       cst.SimpleWhitespace(""))
                                                 if default else cst.MaybeSentinel.DEFAULT))
        body = list(updated_node.body.body)
        body.insert(self._after_super_init(body), cst.parse_statement(f"self.{SETTINGS} = {SETTINGS}"))
        return updated_node.with_changes(
            params=updated_node.params.with_changes(params=params),
            body=updated_node.body.with_changes(body=body),
        )

    def _in_threaded_init(self, node: cst.FunctionDef) -> bool:
        return (
            node.name.value == "__init__"
            and len(self._function_stack) == 0
            and bool(self._class_stack)
            and self._class_stack[-1] in self.threaded
        )

    @staticmethod
    def _after_super_init(body: list[cst.BaseStatement]) -> int:
        for index, statement in enumerate(body):
            if m.findall(statement, m.Call(func=m.Attribute(value=m.Call(func=m.Name("super")),
                                                            attr=m.Name("__init__")))):
                return index + 1
        has_docstring = m.matches(body[0], m.SimpleStatementLine(body=[m.Expr(m.SimpleString())])) if body else False
        return 1 if has_docstring else 0

    def _threaded_callee(self, func: cst.BaseExpression) -> str | None:
        """The threaded class a call builds: `Attention(...)`, through a local alias of it, or
        `ATTENTION_CLASSES[...](...)` from a class table (or a local name bound to an entry of one)."""
        if isinstance(func, cst.Name) and func.value in self.threaded:
            return func.value
        if isinstance(func, cst.Name) and func.value in self._class_aliases:
            return self._class_aliases[func.value]
        if m.matches(func, m.Subscript(value=m.Name())) and func.value.value in self.class_tables:
            return self.class_tables[func.value.value]
        return None

    def leave_Call(self, original_node: cst.Call, updated_node: cst.Call) -> cst.Call:
        callee = self._threaded_callee(updated_node.func)
        if callee is None:
            return updated_node
        if not (self._function_stack == ["__init__"] and self._class_stack and self._class_stack[-1] in self.threaded):
            where = ".".join(self._class_stack + self._function_stack) or "module level"
            raise ScaffoldError(
                f"{self.spec.source.display_modeling}: {callee}(...) is built in {where}, where no runner_settings "
                f"is in scope; only module constructors that take `config` can pass it on"
            )
        config_position = self.spec.classes[callee].init_params.index("config")
        args = list(updated_node.args)
        positional = [arg for arg in args if arg.keyword is None and not arg.star]
        if len(positional) > config_position + 1:
            args.insert(config_position + 1, cst.Arg(cst.Name(SETTINGS), comma=args[config_position].comma))
        else:
            if args:
                args[-1] = args[-1].with_changes(comma=cst.Comma(whitespace_after=cst.SimpleWhitespace(" ")))
            args.append(cst.Arg(cst.Name(SETTINGS), keyword=cst.Name(SETTINGS),
                                equal=cst.AssignEqual(cst.SimpleWhitespace(""), cst.SimpleWhitespace(""))))
        return updated_node.with_changes(args=args)


class AddMethodCommand(CodemodCommand):
    """Insert a method, given as source, into a top-level class right after its `__init__` (replacing a
    method of the same name), with the imports (module, name) it needs."""

    DESCRIPTION = "Add a method to a class."

    def __init__(self, context: CodemodContext, class_name: str, method: cst.FunctionDef,
                 imports: tuple[tuple[str, str], ...] = ()):
        super().__init__(context)
        self.class_name = class_name
        self.method = method
        self.imports = imports

    def transform_module_impl(self, tree: cst.Module) -> cst.Module:
        tree = tree.with_changes(body=[
            self._add_to(statement) if defined_name(statement) == self.class_name else statement
            for statement in tree.body
        ])
        for module in sorted({module for module, _ in self.imports}):
            tree = _import_after_last_import(tree, module, sorted(name for m_, name in self.imports if m_ == module))
        return tree

    def _add_to(self, updated_node: cst.ClassDef) -> cst.ClassDef:
        body = list(updated_node.body.body)
        names = [defined_name(statement) for statement in body]
        if self.method.name.value in names:
            body.pop(names.index(self.method.name.value))
            names.remove(self.method.name.value)
        position = names.index("__init__") + 1 if "__init__" in names else len(body)
        body.insert(position, self.method.with_changes(leading_lines=[cst.EmptyLine(indent=False)]))
        return updated_node.with_changes(body=updated_node.body.with_changes(body=body))


class DropAutoDocstringCommand(CodemodCommand):
    """Remove `@auto_docstring`: it only builds HF's documentation, and it rejects the added `runner_settings`
    parameter as undocumented."""

    DESCRIPTION = "Drop HF documentation decorators."

    def transform_module_impl(self, tree: cst.Module) -> cst.Module:
        return tree.visit(_DropDecorator("auto_docstring"))


class _DropDecorator(cst.CSTTransformer):
    def __init__(self, name: str):
        super().__init__()
        self.name = name

    def _keep(self, decorator: cst.Decorator) -> bool:
        target = decorator.decorator.func if isinstance(decorator.decorator, cst.Call) else decorator.decorator
        return not (isinstance(target, cst.Name) and target.value == self.name)

    def leave_FunctionDef(self, original_node: cst.FunctionDef, updated_node: cst.FunctionDef) -> cst.FunctionDef:
        return updated_node.with_changes(decorators=[d for d in updated_node.decorators if self._keep(d)])

    def leave_ClassDef(self, original_node: cst.ClassDef, updated_node: cst.ClassDef) -> cst.ClassDef:
        return updated_node.with_changes(decorators=[d for d in updated_node.decorators if self._keep(d)])


# HF's own tensor-, pipeline- and expert-parallel plans: the port's parallel layers replace what they describe.
HF_DISTRIBUTED_PLANS = {"_tp_plan", "_pp_plan", "_ep_plan"}
EXAMPLE_SECTION = re.compile(r"\n([ \t]*)Examples?:")


class DropHfSurfaceCommand(CodemodCommand):
    """Drop what would tell a reader of the port something untrue: HF's distributed plans beside the port's
    parallel layers, and docstring examples that build the model with `from_pretrained` (a port is built by its
    runner)."""

    DESCRIPTION = "Drop HF surface the runtime contradicts."

    def transform_module_impl(self, tree: cst.Module) -> cst.Module:
        return tree.visit(_DropHfSurface())


class _DropHfSurface(cst.CSTTransformer):
    def leave_ClassDef(self, original_node: cst.ClassDef, updated_node: cst.ClassDef) -> cst.ClassDef:
        plan = m.SimpleStatementLine(body=[m.Assign(targets=[m.AssignTarget(
            m.Name(m.MatchIfTrue(lambda name: name in HF_DISTRIBUTED_PLANS)))])])
        body = [statement for statement in updated_node.body.body if not m.matches(statement, plan)]
        return _without_from_pretrained_example(updated_node.with_changes(body=updated_node.body.with_changes(
            body=body)))

    def leave_FunctionDef(self, original_node: cst.FunctionDef, updated_node: cst.FunctionDef) -> cst.FunctionDef:
        return _without_from_pretrained_example(updated_node)


def _without_from_pretrained_example(node: cst.ClassDef | cst.FunctionDef) -> cst.ClassDef | cst.FunctionDef:
    """The definition with its docstring's example section cut when that example calls `from_pretrained`; a
    docstring left empty goes (unless it is the whole body)."""
    body = list(node.body.body) if isinstance(node.body, cst.IndentedBlock) else []
    docstring = m.SimpleStatementLine(body=[m.Expr(value=m.SimpleString())])
    if not body or not m.matches(body[0], docstring):
        return node
    literal = body[0].body[0].value
    if ".from_pretrained(" not in literal.value:
        return node
    quote = literal.quote
    content = literal.value[len(literal.prefix) + len(quote):-len(quote)]
    example = EXAMPLE_SECTION.search(content)
    kept = content[:example.start()] if example else ""
    if kept.strip():
        indent = example.group(1)
        body[0] = body[0].with_changes(body=[cst.Expr(literal.with_changes(
            value=f"{literal.prefix}{quote}{kept.rstrip()}\n{indent}{quote}"))])
    elif len(body) > 1:
        body = body[1:]
    else:
        return node
    return node.with_changes(body=node.body.with_changes(body=body))


class ReplaceHeaderCommand(CodemodCommand):
    """Drop HF's "generated from modular, do not edit" banner (the port is meant to be edited); keep the licence."""

    DESCRIPTION = "Replace the modular-generation banner."

    def transform_module_impl(self, updated_node: cst.Module) -> cst.Module:
        header = list(updated_node.header)
        if any(line.comment and MODULAR_BANNER_MARK in line.comment.value for line in header):
            first_kept = next(
                (index for index, line in enumerate(header) if line.comment and "Copyright" in line.comment.value),
                len(header),
            )
            header = header[first_kept:]
        return updated_node.with_changes(header=header)


FROZEN_TABLE_INIT = m.Call(
    func=m.Attribute(value=m.Call(func=m.Name("super")), attr=m.Name("__init__")),
    args=[m.ZeroOrMore(), m.Arg(keyword=m.Name("_freeze")), m.ZeroOrMore()],
)
PARALLEL_CLASSES = {
    "column": "ColumnParallelLinear",
    "row": "RowParallelLinear",
    "lm_head": "ParallelLMHead",
    "vocab_embedding": "VocabParallelEmbedding",
}
TENSOR_FACTORIES = {"empty", "zeros", "ones", "randn", "rand"}
LAYERS_MODULE = "core.layers"


def _as_linear_call(call: cst.Call) -> cst.Call:
    """GPT-2's `Conv1D(nf, nx)` (out, in; weight stored [in, out]) as the linear it is:
    `nn.Linear(nx, nf, checkpoint_transposed=True)`, which the parallel layers then replace."""
    positional = [arg for arg in call.args if arg.keyword is None]
    if len(positional) != 2 or len(call.args) != 2:
        raise ScaffoldError("Conv1D(...) is not built as Conv1D(out_features, in_features); the parallel layers "
                            "cannot rewrite it")
    out_features, in_features = positional
    return cst.Call(cst.Attribute(cst.Name("nn"), cst.Name("Linear")), args=[
        in_features.with_changes(comma=_comma()), out_features.with_changes(comma=_comma()),
        _keyword("checkpoint_transposed", cst.Name("True"))])


def _keyword(name: str, value: cst.BaseExpression) -> cst.Arg:
    return cst.Arg(value, keyword=cst.Name(name),
                   equal=cst.AssignEqual(cst.SimpleWhitespace(""), cst.SimpleWhitespace("")))


def _comma() -> cst.Comma:
    return cst.Comma(whitespace_after=cst.SimpleWhitespace(" "))


def _with_trailing_args(call: cst.Call, extra: list[cst.Arg]) -> list[cst.Arg]:
    """The call's arguments plus `extra`, keeping its closing layout (trailing comma, newline before `)`)."""
    args = list(call.args)
    closing_comma, closing_space = cst.MaybeSentinel.DEFAULT, cst.SimpleWhitespace("")
    if args:
        closing_comma, closing_space = args[-1].comma, args[-1].whitespace_after_arg
        args[-1] = args[-1].with_changes(comma=_comma(), whitespace_after_arg=cst.SimpleWhitespace(""))
    args += [arg.with_changes(comma=_comma()) for arg in extra[:-1]]
    args.append(extra[-1].with_changes(comma=closing_comma, whitespace_after_arg=closing_space))
    return args


class ApplyTensorParallelPlanCommand(CodemodCommand):
    """Swap nn.Linear / nn.Embedding / nn.Parameter for the parallel layers the plan assigns, make per-rank head
    counts local, sum partial outputs (e.g. experts) over their group where the plan says so, and merge sibling
    column layers that read one input (q|k|v, gate|up) into one matmul."""

    DESCRIPTION = "Apply the tensor-parallel plan."

    def __init__(self, context: CodemodContext, spec: ModelSpec, plan: TensorParallelPlan):
        super().__init__(context)
        self.spec = spec
        self.plan = plan

    def transform_module_impl(self, tree: cst.Module) -> cst.Module:
        transformer = _ApplyPlan(self.spec, self.plan)
        tree, merged = merge_sibling_linears(tree.visit(transformer))
        candidates = transformer.imports | ({MERGED_LAYER} if merged else set())
        return _import_after_last_import(tree, LAYERS_MODULE, sorted(candidates & names_used(tree)))


def _import_after_last_import(tree: cst.Module, module: str, names: list[str]) -> cst.Module:
    if not names:
        return tree
    statement = cst.parse_statement(f"from {module} import {', '.join(names)}")
    body = list(tree.body)
    imports = m.SimpleStatementLine(body=[m.Import() | m.ImportFrom()])
    last_import = max((index for index, node in enumerate(body) if m.matches(node, imports)), default=-1)
    body.insert(last_import + 1, statement)
    return tree.with_changes(body=body)


class _ApplyPlan(cst.CSTTransformer):
    def __init__(self, spec: ModelSpec, plan: TensorParallelPlan):
        super().__init__()
        self.spec = spec
        self.plan = plan
        self.imports: set[str] = set()
        self._class_stack: list[str] = []
        self._function_stack: list[str] = []
        # `self.num_heads = config.num_attention_heads` before it is made per-rank: a parallel layer's
        # constructor takes full sizes, so `self.num_heads * head_dim` there reads the full count.
        self._full_head_counts: dict[tuple[str, str], cst.BaseExpression] = {}
        # Sizes __init__ derives from those counts (`self.key_dim = self.head_k_dim * self.num_k_heads`, a local
        # `projection_size = self.key_dim * 2 + ...`), at full size, for the same constructors.
        self._full_locals: dict[tuple[str, str], cst.BaseExpression] = {}
        # (class, attribute) of norms over every head at once, filled from __init__ before forward is visited.
        self._head_spanning_norms: dict[tuple[str, str], str] = {}
        # Classes that keep per-rank sizes: split by heads, or holding a size the override makes per-rank.
        self._head_classes = ({cls for (cls, _), role in plan.roles.items() if role.num_heads}
                              | {cls for cls, _ in plan.per_rank_sizes})

    def visit_ClassDef(self, node: cst.ClassDef) -> None:
        self._class_stack.append(node.name.value)

    def visit_FunctionDef(self, node: cst.FunctionDef) -> None:
        self._function_stack.append(node.name.value)

    def leave_FunctionDef(self, original_node: cst.FunctionDef, updated_node: cst.FunctionDef) -> cst.FunctionDef:
        self._function_stack.pop()
        return updated_node

    def leave_Attribute(self, original_node: cst.Attribute, updated_node: cst.Attribute) -> cst.BaseExpression:
        """Outside __init__ (which sizes the full layers), a head-sharded class's `self.config.num_*_heads`
        counts the heads of this rank's activations (Phi-3's `query_pos` slicing its q|k|v output); a tensor laid
        out like a merged layer's output is read as this rank's columns of it."""
        if (self._class_stack and self._function_stack and self._function_stack[-1] != "__init__"
                and m.matches(updated_node, m.Attribute(value=m.Name("self")))
                and (self._class_stack[-1], updated_node.attr.value) in self.plan.sliced_like):
            layer = self.plan.sliced_like[(self._class_stack[-1], updated_node.attr.value)]
            return cst.parse_expression(f"self.{layer}.local_columns(self.{updated_node.attr.value})")
        if (self._class_stack and self._class_stack[-1] in self._head_classes
                and self._function_stack and self._function_stack[-1] != "__init__"
                and m.matches(updated_node, m.Attribute(value=m.Attribute(value=m.Name("self"), attr=m.Name("config")),
                                                        attr=HEAD_COUNT_NAME))):
            return updated_node.visit(_LocalHeadCounts(self.imports))
        return updated_node

    def leave_ClassDef(self, original_node: cst.ClassDef, updated_node: cst.ClassDef) -> cst.ClassDef:
        """A model's own embedding subclass (e.g. Gemma's scaled embedding) becomes vocab-parallel too, unless it
        is a frozen table (Marian's sinusoidal positions pass `_freeze=True`): computed, never a vocabulary."""
        self._class_stack.pop()
        if m.findall(updated_node, FROZEN_TABLE_INIT):
            return updated_node
        bases = [
            base.with_changes(value=cst.Name(PARALLEL_CLASSES["vocab_embedding"]))
            if m.matches(base.value, m.Attribute(value=m.Name("nn"), attr=m.Name("Embedding"))) else base
            for base in updated_node.bases
        ]
        if bases != list(updated_node.bases):
            self.imports.add(PARALLEL_CLASSES["vocab_embedding"])
        return updated_node.with_changes(bases=bases)

    def leave_Assign(self, original_node: cst.Assign, updated_node: cst.Assign) -> cst.Assign:
        if not self._class_stack or len(updated_node.targets) != 1:
            return updated_node
        target = updated_node.targets[0].target
        in_head_init = self._class_stack[-1] in self._head_classes and self._function_stack[-1:] == ["__init__"]
        if isinstance(target, cst.Name) and in_head_init:
            self._record_derived_size(self._full_locals, target.value, updated_node.value)
        if not m.matches(target, m.Attribute(value=m.Name("self"))):
            return updated_node
        class_name, attribute = self._class_stack[-1], target.attr.value
        head_count = self._norm_head_count(class_name, updated_node.value)
        if head_count:
            self._head_spanning_norms[(class_name, attribute)] = head_count
        if (class_name, attribute) in self.plan.per_rank_sizes and in_head_init:
            self._full_head_counts[(class_name, attribute)] = updated_node.value
            self.imports.add("local_share")
            heads = cst.parse_expression(self.plan.per_rank_sizes[(class_name, attribute)])
            return updated_node.with_changes(value=cst.Call(cst.Name("local_share"), args=[
                cst.Arg(updated_node.value, comma=_comma()), cst.Arg(heads, comma=_comma()),
                cst.Arg(cst.SimpleString('"attn_tp"'))]))
        spanning = (self._spanning_per_rank_size(class_name, updated_node.value)
                    if in_head_init and (class_name, attribute) not in self.plan.whole else None)
        if spanning is not None:
            return updated_node.with_changes(value=spanning)
        if class_name in self._head_classes and attribute in PER_RANK_HEAD_COUNTS:
            self._full_head_counts[(class_name, attribute)] = updated_node.value
            local = _LocalHeadCounts(self.imports, self._head_count_parameters(class_name))
            return updated_node.with_changes(value=updated_node.value.visit(local))
        if class_name in self._head_classes and attribute in HEAD_SIZES:
            # `self.head_dim = self.embed_dim // self.num_heads` divides by the full head count.
            return updated_node.with_changes(value=self._full_head_counts_in(updated_node.value, class_name))
        call = constructed_call(updated_node.value)
        if in_head_init and call is None:
            self._record_derived_size(self._full_head_counts, attribute, updated_node.value)
        if (class_name, attribute) not in self.plan.roles or call is None:
            return updated_node
        role = self.plan.role_of(class_name, attribute)
        parallel = self._parallel_call(self._full_head_counts_in(call, class_name), role, class_name, attribute)
        return updated_node.with_changes(value=updated_node.value.deep_replace(call, parallel))

    def leave_If(self, original_node: cst.If, updated_node: cst.If) -> cst.If:
        """A check in __init__ (`if self.head_dim * self.num_heads != self.embed_dim: raise ...`) is about the
        model's full sizes."""
        if not (self._class_stack and self._class_stack[-1] in self._head_classes
                and self._function_stack[-1:] == ["__init__"]):
            return updated_node
        return updated_node.with_changes(test=self._full_head_counts_in(updated_node.test, self._class_stack[-1]))

    def _head_count_parameters(self, class_name: str) -> frozenset[str]:
        """Constructor parameters of a class built without `config` that count its heads (XGLM's `num_heads`)."""
        params = self.spec.classes[class_name].init_params
        return frozenset() if "config" in params else frozenset(params) & HEAD_COUNTS

    def _head_count(self, class_name: str, config_expression: str) -> str:
        """The plan's head count (`config.num_attention_heads`) as this class's __init__ can read it: from a
        `num_heads` parameter when the class is built without `config` (every head then counts as a KV head too)."""
        parameters = self._head_count_parameters(class_name)
        return min(parameters) if parameters and config_expression.startswith("config.") else config_expression

    def _full_head_counts_in(self, expression: cst.BaseExpression, class_name: str) -> cst.BaseExpression:
        for (owner, attribute), full in self._full_head_counts.items():
            if owner == class_name:
                expression = m.replace(expression, m.Attribute(value=m.Name("self"), attr=m.Name(attribute)), full)
        local_sizes = {name: full for (owner, name), full in self._full_locals.items() if owner == class_name}
        return expression.visit(_ReplaceNames(local_sizes)) if local_sizes else expression

    def _record_derived_size(self, table: dict, name: str, value: cst.BaseExpression) -> None:
        """Remember `name`'s full size when `value` is size arithmetic (no calls) over per-rank head counts."""
        if m.findall(value, m.Call()):
            return
        full = self._full_head_counts_in(value, self._class_stack[-1])
        if not full.deep_equals(value):
            needs_parentheses = isinstance(full, cst.BinaryOperation) and not full.lpar
            table[(self._class_stack[-1], name)] = (
                full.with_changes(lpar=[cst.LeftParen()], rpar=[cst.RightParen()]) if needs_parentheses else full)

    def _parallel_call(self, call: cst.Call, role: WeightRole, class_name: str, attribute: str) -> cst.Call:
        if role.role == "replicated":
            return call
        if m.matches(call.func, m.Name("Conv1D")):
            call = _as_linear_call(call)
        if role.role in PARALLEL_CLASSES:
            name = PARALLEL_CLASSES[role.role]
            extra = [_keyword("group", cst.SimpleString(f'"{role.group}"'))]
            if role.num_heads:
                extra.append(_keyword("num_heads", cst.parse_expression(self._head_count(class_name, role.num_heads))))
            self.imports.add(name)
            return call.with_changes(func=cst.Name(name), args=_with_trailing_args(call, extra))
        if role.role == "merged_column":
            return self._merged_column_call(call, role, class_name, f"{class_name}.{attribute}")
        if role.role == "channels":
            return self._channels_call(call, role, class_name, f"{class_name}.{attribute}")
        if role.role == "sharded" and not self._is_factory_parameter(call):
            # Built from other tensors (`nn.Parameter(torch.log(A))`): at this rank's size already, since what it
            # is built from counts this rank's heads.
            self.imports.add("local_shard")
            return cst.Call(cst.Name("local_shard"), args=[
                cst.Arg(call, comma=_comma()), _keyword("group", cst.SimpleString(f'"{role.group}"')).with_changes(
                    comma=_comma()), _keyword("dim", cst.Integer(str(role.dim or 0)))])
        self.imports.add("sharded_parameter")
        shape, dtype = self._parameter_shape(call, f"{class_name}.{attribute}")
        extra = [_keyword("group", cst.SimpleString(f'"{role.group}"'))]
        if role.role == "sharded":
            extra.append(_keyword("dim", cst.Integer(str(role.dim))))
            if role.segments > 1:
                extra.append(_keyword("segments", cst.Integer(str(role.segments))))
        else:
            extra.append(_keyword("summand", cst.Name("True")))
        if dtype is not None:
            extra.append(_keyword("dtype", dtype))
        return cst.Call(cst.Name("sharded_parameter"), args=_with_trailing_args(cst.Call(
            cst.Name("sharded_parameter"), args=[cst.Arg(shape)]), extra))

    def _merged_column_call(self, call: cst.Call, role: WeightRole, class_name: str, where: str) -> cst.Call:
        """`nn.Linear(hidden, fused_size, bias=...)` → `MergedColumnParallelLinear(hidden, [sizes], bias=...,
        group=..., num_heads=[...])`: each fused segment is split over the group on its own."""
        positional = [arg for arg in call.args if arg.keyword is None]
        if len(positional) != 2:
            raise ScaffoldError(f"{self.spec.source.display_modeling}: {where} is not built as "
                                f"nn.Linear(in_features, out_features, ...); merged_column cannot rewrite it")
        sizes, extra = self._segment_arguments(role, class_name)
        args = [positional[0], cst.Arg(sizes)] + [arg for arg in call.args if arg.keyword is not None]
        args = [arg.with_changes(comma=_comma()) for arg in args[:-1]] + [args[-1]]
        self.imports.add(MERGED_LAYER)
        return cst.Call(cst.Name(MERGED_LAYER), args=_with_trailing_args(cst.Call(cst.Name(MERGED_LAYER), args=args),
                                                                          extra))

    def _segment_arguments(self, role: WeightRole, class_name: str) -> tuple[cst.List, list[cst.Arg]]:
        """A segmented role's full segment sizes, and its `group=` / `num_heads=[...]` keywords."""
        sizes = cst.List([cst.Element(self._full_head_counts_in(cst.parse_expression(size), class_name))
                          for size in role.output_sizes])
        extra = [_keyword("group", cst.SimpleString(f'"{role.group}"'))]
        if any(count is not None for count in role.segment_heads):
            heads = cst.List([cst.Element(cst.parse_expression(str(count))) for count in role.segment_heads])
            extra.append(_keyword("num_heads", heads))
        return sizes, extra

    def _channels_call(self, call: cst.Call, role: WeightRole, class_name: str, where: str) -> cst.Call:
        """`nn.Conv1d(in_channels=c, out_channels=c, groups=c, kernel_size=k, ...)` (depthwise) →
        `ChannelParallelConv1d([sections], kernel_size=k, ..., group=..., num_heads=[...])`."""
        keywords = {arg.keyword.value: arg for arg in call.args if arg.keyword is not None}
        if any(arg.keyword is None for arg in call.args) or not {"in_channels", "out_channels", "groups"} <= set(keywords):
            raise ScaffoldError(f"{self.spec.source.display_modeling}: {where} is not built as nn.Conv1d(in_channels=c, "
                                f"out_channels=c, groups=c, ...); the channels role splits depthwise convolutions only")
        sections, extra = self._segment_arguments(role, class_name)
        kept = [arg for name, arg in keywords.items() if name not in ("in_channels", "out_channels", "groups")]
        args = [cst.Arg(sections)] + kept
        args = [arg.with_changes(comma=_comma()) for arg in args[:-1]] + [args[-1].with_changes(
            comma=cst.MaybeSentinel.DEFAULT)]
        self.imports.add("ChannelParallelConv1d")
        return cst.Call(cst.Name("ChannelParallelConv1d"),
                        args=_with_trailing_args(cst.Call(cst.Name("ChannelParallelConv1d"), args=args), extra))

    @staticmethod
    def _is_factory_parameter(call: cst.Call) -> bool:
        factory = call.args[0].value if call.args else None
        return isinstance(factory, cst.Call) and isinstance(factory.func, cst.Attribute) and (
            factory.func.attr.value in TENSOR_FACTORIES or factory.func.attr.value == "full")

    def _parameter_shape(self, call: cst.Call, where: str) -> tuple[cst.BaseExpression, cst.BaseExpression | None]:
        """The shape tuple and the `dtype=` (if any) of `nn.Parameter(torch.empty(a, b))` /
        `nn.Parameter(torch.zeros((a, b), dtype=...))` / `nn.Parameter(torch.full((a, b), value))` (the values come
        from the checkpoint)."""
        factory = call.args[0].value if call.args else None
        filled = m.matches(factory, m.Call(func=m.Attribute(attr=m.Name("full")),
                                           args=[m.Arg(m.Tuple() | m.List(), keyword=None), m.ZeroOrMore()]))
        if not filled and not (isinstance(factory, cst.Call) and isinstance(factory.func, cst.Attribute)
                               and factory.func.attr.value in TENSOR_FACTORIES
                               and all(arg.keyword is None or arg.keyword.value == "dtype" for arg in factory.args)):
            raise ScaffoldError(
                f"{self.spec.source.display_modeling}: {where} is not built as nn.Parameter(torch.empty(*shape)); "
                f"give it a role the generator can rewrite in the override file"
            )
        dtype = next((arg.value for arg in factory.args if arg.keyword is not None and arg.keyword.value == "dtype"),
                     None)
        sizes = [arg for arg in factory.args if arg.keyword is None]
        if (filled or len(sizes) == 1) and isinstance(sizes[0].value, (cst.Tuple, cst.List)):
            elements = sizes[0].value.elements
        else:
            elements = [cst.Element(arg.value) for arg in sizes]
        elements = [element.with_changes(comma=cst.MaybeSentinel.DEFAULT) for element in elements]
        commas = [element.with_changes(comma=_comma()) for element in elements[:-1]]
        last = elements[-1].with_changes(comma=cst.Comma()) if len(elements) == 1 else elements[-1]
        return cst.Tuple(commas + [last]), dtype

    def _spanning_per_rank_size(self, class_name: str, value: cst.BaseExpression) -> cst.BaseExpression | None:
        """`Norm(self.intermediate_size, ...)` over a per-rank size (also as a branch of `... if c else
        nn.Identity()`): built at full size and applied to every head at once (`over_all_heads(Norm(<full size>,
        ...), heads, "attn_tp")`), as at TP=1."""
        norms = [call for call in m.findall(value, m.Call(func=m.Name()))
                 if NORM_CLASS.search(call.func.value) and (value is call or m.matches(value, m.IfExp()))]
        for norm in norms:
            sized_by = [heads for (owner, attribute), heads in self.plan.per_rank_sizes.items() if owner == class_name
                        and m.findall(norm, m.Attribute(value=m.Name("self"), attr=m.Name(attribute)))]
            if sized_by:
                self.imports.add("over_all_heads")
                wrapped = cst.Call(cst.Name("over_all_heads"), args=[
                    cst.Arg(self._full_head_counts_in(norm, class_name), comma=_comma()),
                    cst.Arg(cst.parse_expression(sized_by[0]), comma=_comma()), cst.Arg(cst.SimpleString('"attn_tp"'))])
                return value.deep_replace(norm, wrapped) if value is not norm else wrapped
        return None

    def _merged_output_split(self, call: cst.Call) -> cst.Call | None:
        """`self.c_attn(x).split(self.split_size, dim=2)` on a merged column layer's output: the rank's output holds
        its part of each segment, so it splits by the layer's per-rank sizes (`self.c_attn.split_sizes`)."""
        pattern = m.Call(func=m.Attribute(value=m.Call(func=m.Attribute(value=m.Name("self"), attr=m.Name())),
                                          attr=m.Name("split")))
        if not (self._class_stack and m.matches(call, pattern) and call.args and call.args[0].keyword is None):
            return None
        layer = call.func.value.func.attr.value
        role = self.plan.roles.get((self._class_stack[-1], layer))
        if role is None or role.role != "merged_column":
            return None
        sizes = cst.parse_expression(f"self.{layer}.split_sizes")
        return call.with_changes(args=[call.args[0].with_changes(value=sizes), *call.args[1:]])

    def _norm_head_count(self, class_name: str, value: cst.BaseExpression) -> str | None:
        """`Norm(config.num_attention_heads * self.head_dim, ...)` in a head-sharded class: a norm over every head
        at once; one of `config.hidden_size` there spans all query heads (OLMoE's q_norm, BitNet's norm of the
        attention output). Returns the head count as `forward` reads it (`self.config.num_attention_heads`)."""
        if not (class_name in self._head_classes and m.matches(value, m.Call(func=m.Name())) and value.args
                and NORM_CLASS.search(value.func.value)):
            return None
        size = value.args[0].value
        if m.matches(size, m.Attribute(value=m.Name("config"), attr=m.Name("hidden_size"))):
            return "self.config.num_attention_heads"
        counts = m.findall(size, m.Attribute(attr=HEAD_COUNT_NAME))
        return f"self.config.{counts[0].attr.value}" if counts else None

    def leave_Call(self, original_node: cst.Call, updated_node: cst.Call) -> cst.BaseExpression:
        merged = self._merged_output_split(updated_node)
        if merged is not None:
            return merged
        if not self._class_stack or not m.matches(updated_node.func, m.Attribute(value=m.Name("self"))):
            return updated_node
        head_count = self._head_spanning_norms.get((self._class_stack[-1], updated_node.func.attr.value))
        if head_count and len(updated_node.args) == 1:
            return self._around_all_heads(updated_node, head_count)
        group = self.plan.reductions.get((self._class_stack[-1], updated_node.func.attr.value))
        if group is None:
            return updated_node
        self.imports.add("all_reduce")
        return cst.Call(cst.Name("all_reduce"), args=[
            cst.Arg(updated_node, comma=_comma()),
            _keyword("group", cst.SimpleString(f'"{group}"')),
        ])


    def _around_all_heads(self, call: cst.Call, head_count: str) -> cst.Call:
        """`self.q_norm(x)` → `scatter_heads(self.q_norm(gather_heads(x, H, "attn_tp")), H, "attn_tp")`: the norm
        sees every head, as at TP=1, and each rank keeps its own heads of the result."""
        self.imports.update({"gather_heads", "scatter_heads"})

        def heads_call(name: str, tensor: cst.BaseExpression) -> cst.Call:
            return cst.Call(cst.Name(name), args=[
                cst.Arg(tensor, comma=_comma()),
                cst.Arg(cst.parse_expression(head_count), comma=_comma()),
                cst.Arg(cst.SimpleString('"attn_tp"')),
            ])

        tensor = call.args[0]
        gathered = call.with_changes(args=[tensor.with_changes(value=heads_call("gather_heads", tensor.value))])
        return heads_call("scatter_heads", gathered)


class _ReplaceNames(cst.CSTTransformer):
    """Local variable names → expressions (never the attribute part of `x.name`)."""

    def __init__(self, expressions: dict[str, cst.BaseExpression]):
        super().__init__()
        self.expressions = expressions

    def leave_Attribute(self, original_node: cst.Attribute, updated_node: cst.Attribute) -> cst.Attribute:
        return updated_node.with_changes(attr=original_node.attr)

    def leave_Arg(self, original_node: cst.Arg, updated_node: cst.Arg) -> cst.Arg:
        return updated_node.with_changes(keyword=original_node.keyword)

    def leave_Name(self, original_node: cst.Name, updated_node: cst.Name) -> cst.BaseExpression:
        return self.expressions.get(updated_node.value, updated_node)


class _LocalHeadCounts(cst.CSTTransformer):
    """`config.num_key_value_heads` → `local_heads(config.num_key_value_heads, "attn_tp")`; so too a head count
    passed as a constructor parameter (`num_heads`, in attention classes built without `config`)."""

    def __init__(self, imports: set[str], head_count_parameters: frozenset[str] = frozenset()):
        super().__init__()
        self.imports = imports
        self.head_count_parameters = head_count_parameters

    def visit_Attribute(self, node: cst.Attribute) -> bool:
        # `x.num_heads` names an attribute, not the parameter: only the object part may hold the parameter.
        return False

    def leave_Attribute(self, original_node: cst.Attribute, updated_node: cst.Attribute) -> cst.BaseExpression:
        if updated_node.attr.value in HEAD_COUNTS:
            return self._local(updated_node)
        return updated_node.with_changes(value=updated_node.value.visit(self))

    def leave_Name(self, original_node: cst.Name, updated_node: cst.Name) -> cst.BaseExpression:
        return self._local(updated_node) if updated_node.value in self.head_count_parameters else updated_node

    def _local(self, count: cst.BaseExpression) -> cst.Call:
        self.imports.add("local_heads")
        return cst.Call(cst.Name("local_heads"), args=[
            cst.Arg(count, comma=_comma()),
            cst.Arg(cst.SimpleString('"attn_tp"')),
        ])


def method_from_template(class_source: str) -> cst.FunctionDef:
    """The first method of a rendered template class: written inside a class so that its docstring and body
    are indented as they will be in the port."""
    template_class = cst.parse_module(class_source).body[0]
    return next(item for item in template_class.body.body if isinstance(item, cst.FunctionDef))


def port_modeling_module(spec: ModelSpec, plan: TensorParallelPlan, prepare_inputs_source: str,
                         prepare_inputs_imports: tuple[tuple[str, str], ...]) -> str:
    commands = (
        ReplaceHeaderCommand(CodemodContext()),
        AbsoluteImportsCommand(CodemodContext(), spec.source.package),
        DropAutoDocstringCommand(CodemodContext()),
        DropHfSurfaceCommand(CodemodContext()),
        PruneToCausalLMCommand(CodemodContext(), spec.causal_lm_class),
        ThreadRunnerSettingsCommand(CodemodContext(), spec),
        ApplyTensorParallelPlanCommand(CodemodContext(), spec, plan),
        AddMethodCommand(CodemodContext(), spec.causal_lm_class, method_from_template(prepare_inputs_source),
                         prepare_inputs_imports),
    )
    module = spec.modeling
    for command in commands:
        # transform_module() would first deep-copy the tree for metadata none of these commands reads: at
        # seven passes that copying, not the transformation, dominated the generator's run time.
        module = command.transform_module_impl(module)
    return module.code
