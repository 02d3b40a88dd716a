"""Merge sibling column-parallel linears that read the same input (q|k|v, gate|up) into one matmul.

One [in, q+k+v] matmul instead of three reads the same weights with a third of the calls: on CPU decode, where
each matmul is a small GEMV, the calls' overhead is what the merge saves. The checkpoint keeps its separate
tensors (the merged layer's `checkpoint_names` load them as segments), and the model's code changes only where
the siblings are built and called:

    self.qkv_proj = MergedColumnParallelLinear(hidden, [q, k, v], ..., checkpoint_names=["q_proj", "k_proj", "v_proj"])
    q_proj_output, k_proj_output, v_proj_output = self.qkv_proj(hidden_states).split(self.qkv_proj.split_sizes, dim=-1)
    query_states = q_proj_output.view(hidden_shape).transpose(1, 2)

A group is merged only when the rewrite is plainly equivalent: every sibling built in `__init__` as a
ColumnParallelLinear of the same input size, bias and group; each called exactly once, in one method, on the same
argument, in top-level simple statements, with nothing reassigning that argument between the calls; and no
other code reaching for the siblings (e.g. `module.q_proj` in weight init). Otherwise the code stays as it is.
"""

from __future__ import annotations

from dataclasses import dataclass

import libcst as cst
import libcst.matchers as m

from scaffold.inspect import names_used

MERGEABLE_SIBLINGS = {
    ("q_proj", "k_proj", "v_proj"): "qkv_proj",
    ("gate_proj", "up_proj"): "gate_up_proj",
}
COLUMN_LAYER = "ColumnParallelLinear"
MERGED_LAYER = "MergedColumnParallelLinear"


@dataclass
class _Constructor:
    index: int
    in_features: str
    out_features: str
    bias: str
    group: str
    num_heads: str | None


def _code(node: cst.CSTNode) -> str:
    return cst.Module([]).code_for_node(node)


def _self_attribute(node: cst.CSTNode) -> str | None:
    if m.matches(node, m.Attribute(value=m.Name("self"), attr=m.Name())):
        return node.attr.value
    return None


def _column_constructor(init: cst.FunctionDef, attribute: str) -> _Constructor | None:
    """`self.<attribute> = ColumnParallelLinear(in, out, bias=..., group=..., num_heads=...)` at the top level of
    __init__, its arguments as code."""
    for index, statement in enumerate(init.body.body):
        if not m.matches(statement, m.SimpleStatementLine(body=[m.Assign(targets=[m.AssignTarget()])])):
            continue
        assign = statement.body[0]
        if _self_attribute(assign.targets[0].target) != attribute:
            continue
        call = assign.value
        if not m.matches(call, m.Call(func=m.Name(COLUMN_LAYER))):
            return None
        positional = [_code(arg.value) for arg in call.args if arg.keyword is None and not arg.star]
        keywords = {arg.keyword.value: _code(arg.value) for arg in call.args if arg.keyword is not None}
        positional += [keywords.pop(name) for name in ("in_features", "out_features") if name in keywords]
        if len(positional) != 2 or set(keywords) - {"bias", "group", "num_heads"} or any(a.star for a in call.args):
            return None
        return _Constructor(index, positional[0], positional[1], keywords.get("bias", "True"),
                            keywords.get("group", '"attn_tp"'), keywords.get("num_heads"))
    return None


class _SelfReferences(cst.CSTVisitor):
    """Every `self.<name>` in a method: the call sites `self.<name>(arg)` and any other use."""

    def __init__(self, names: set[str]):
        super().__init__()
        self.names = names
        self.calls: dict[str, list[cst.Call]] = {name: [] for name in names}
        self.other_uses: set[str] = set()

    def visit_Call(self, node: cst.Call) -> None:
        name = _self_attribute(node.func)
        if name in self.names:
            self.calls[name].append(node)

    def visit_Attribute(self, node: cst.Attribute) -> None:
        name = _self_attribute(node)
        if name in self.names and not any(node is call.func for calls in self.calls.values() for call in calls):
            self.other_uses.add(name)


class _ForeignReferences(cst.CSTVisitor):
    """Attribute names reached through anything but `self` (`module.q_proj` in an init function)."""

    def __init__(self):
        super().__init__()
        self.names: set[str] = set()

    def visit_Attribute(self, node: cst.Attribute) -> None:
        if not m.matches(node.value, m.Name("self")):
            self.names.add(node.attr.value)


def _assigned_names(statement: cst.CSTNode) -> set[str]:
    names = set()
    for target in [*m.findall(statement, m.AssignTarget()), *m.findall(statement, m.AugAssign()),
                   *m.findall(statement, m.AnnAssign())]:
        names |= names_used(target.target)
    return names


class _ReplaceCalls(cst.CSTTransformer):
    def __init__(self, replacements: dict[str, str]):
        super().__init__()
        self.replacements = replacements

    def leave_Call(self, original_node: cst.Call, updated_node: cst.Call) -> cst.BaseExpression:
        name = _self_attribute(updated_node.func)
        return cst.Name(self.replacements[name]) if name in self.replacements else updated_node


def _merge_call_site(method: cst.FunctionDef, members: tuple[str, ...], merged: str) -> cst.FunctionDef | None:
    references = _SelfReferences(set(members))
    method.visit(references)
    calls = [references.calls[name] for name in members]
    if references.other_uses or any(len(found) != 1 for found in calls):
        return None
    calls = [found[0] for found in calls]
    if any(len(call.args) != 1 or call.args[0].keyword or call.args[0].star for call in calls):
        return None
    if len({_code(call.args[0].value) for call in calls}) != 1:
        return None
    body = list(method.body.body)
    sites = []
    for call in calls:
        site = next((index for index, statement in enumerate(body)
                     if isinstance(statement, cst.SimpleStatementLine) and m.findall(statement, m.Call())
                     and any(found is call for found in m.findall(statement, m.Call()))), None)
        if site is None:
            return None
        sites.append(site)
    argument = calls[0].args[0].value
    first, last = min(sites), max(sites)
    if any(_assigned_names(body[index]) & names_used(argument) for index in range(first, last)):
        return None
    outputs = {name: f"{name}_output" for name in members}
    if set(outputs.values()) & names_used(method):
        return None
    split = cst.parse_statement(
        f"{', '.join(outputs.values())} = self.{merged}({_code(argument)}).split(self.{merged}.split_sizes, dim=-1)"
    )
    body = [statement.visit(_ReplaceCalls(outputs)) if first <= index <= last else statement
            for index, statement in enumerate(body)]
    body.insert(first, split.with_changes(leading_lines=body[first].leading_lines))
    body[first + 1] = body[first + 1].with_changes(leading_lines=[])
    return method.with_changes(body=method.body.with_changes(body=body))


def _merged_constructor(members: tuple[str, ...], merged: str, constructors: list[_Constructor]) -> cst.BaseStatement:
    first = constructors[0]
    arguments = [first.in_features, f"[{', '.join(c.out_features for c in constructors)}]", f"bias={first.bias}",
                 f"group={first.group}"]
    if any(c.num_heads for c in constructors):
        arguments.append(f"num_heads=[{', '.join(c.num_heads or 'None' for c in constructors)}]")
    quoted = ", ".join(f'"{name}"' for name in members)
    arguments.append(f"checkpoint_names=[{quoted}]")
    return cst.parse_statement(f"self.{merged} = {MERGED_LAYER}({', '.join(arguments)})")


def _merge_in_class(node: cst.ClassDef, foreign: set[str]) -> tuple[cst.ClassDef, bool]:
    methods = {item.name.value: index for index, item in enumerate(node.body.body)
               if isinstance(item, cst.FunctionDef)}
    if "__init__" not in methods:
        return node, False
    items = list(node.body.body)
    merged_any = False
    for members, merged in MERGEABLE_SIBLINGS.items():
        init = items[methods["__init__"]]
        constructors = [_column_constructor(init, name) for name in members]
        if None in constructors or set(members) & foreign or merged in names_used(node):
            continue
        if len({(c.in_features, c.bias, c.group) for c in constructors}) != 1:
            continue
        rewritten = None
        for name, index in methods.items():
            if name == "__init__":
                continue
            rewritten = _merge_call_site(items[index], members, merged)
            if rewritten is not None:
                items[index] = rewritten
                break
        if rewritten is None:
            continue
        first = constructors[0].index
        init_body = list(init.body.body)
        statement = _merged_constructor(members, merged, constructors)
        init_body[first] = statement.with_changes(leading_lines=init_body[first].leading_lines)
        dropped = {c.index for c in constructors[1:]}
        init_body = [statement for index, statement in enumerate(init_body) if index not in dropped]
        items[methods["__init__"]] = init.with_changes(body=init.body.with_changes(body=init_body))
        merged_any = True
    return node.with_changes(body=node.body.with_changes(body=items)), merged_any


def merge_sibling_linears(tree: cst.Module) -> tuple[cst.Module, bool]:
    """The module with every mergeable sibling group merged; True when any was (MergedColumnParallelLinear is
    then used)."""
    foreign = _ForeignReferences()
    tree.visit(foreign)
    body, merged_any = [], False
    for statement in tree.body:
        if isinstance(statement, cst.ClassDef):
            statement, merged = _merge_in_class(statement, foreign.names)
            merged_any |= merged
        body.append(statement)
    return tree.with_changes(body=body), merged_any
