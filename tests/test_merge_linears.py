"""The generator merges q|k|v and gate|up into one matmul only where the rewrite is plainly equivalent."""

import textwrap

import libcst as cst
import pytest

from scaffold.merge_linears import merge_sibling_linears

ATTENTION = """
class Attention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.q_proj = ColumnParallelLinear(config.hidden_size, 8 * 16, bias=False, group="attn_tp", num_heads=8)
        self.k_proj = ColumnParallelLinear(config.hidden_size, 2 * 16, bias=False, group="attn_tp", num_heads=2)
        self.v_proj = ColumnParallelLinear(config.hidden_size, 2 * 16, bias=False, group="attn_tp", num_heads=2)

    def forward(self, hidden_states):
        query = self.q_proj(hidden_states).view(shape)
        key = self.k_proj(hidden_states).view(shape)
        value = self.v_proj(hidden_states)
        return query, key, value
"""


def merged(source: str) -> tuple[str, bool]:
    tree, changed = merge_sibling_linears(cst.parse_module(textwrap.dedent(source)))
    return tree.code, changed


def test_q_k_v_become_one_layer_loaded_from_the_separate_tensors():
    code, changed = merged(ATTENTION)
    assert changed
    assert ("self.qkv_proj = MergedColumnParallelLinear(config.hidden_size, [8 * 16, 2 * 16, 2 * 16], bias=False, "
            'group="attn_tp", num_heads=[8, 2, 2], checkpoint_names=["q_proj", "k_proj", "v_proj"])') in code
    assert ("q_proj_output, k_proj_output, v_proj_output = "
            "self.qkv_proj(hidden_states).split(self.qkv_proj.split_sizes, dim=-1)") in code
    assert "query = q_proj_output.view(shape)" in code and "value = v_proj_output" in code
    assert "self.q_proj" not in code and "self.k_proj" not in code


@pytest.mark.parametrize("edit", [
    # the argument changes between the calls: one matmul would read the wrong input for k and v
    lambda s: s.replace("        key = self.k_proj", "        hidden_states = hidden_states * 2\n        key = self.k_proj"),
    # a sibling is reached from outside its class (e.g. weight init): it must keep its name
    lambda s: s + "\ndef init(module):\n    module.k_proj.weight.zero_()\n",
    # a sibling called twice
    lambda s: s.replace("return query, key, value", "return query, key, self.v_proj(hidden_states)"),
    # different inputs
    lambda s: s.replace("self.v_proj(hidden_states)", "self.v_proj(other)"),
    # different bias
    lambda s: s.replace('2 * 16, bias=False, group="attn_tp", num_heads=2)\n\n',
                        '2 * 16, bias=True, group="attn_tp", num_heads=2)\n\n'),
])
def test_siblings_stay_apart_when_merging_could_change_the_result(edit):
    source = edit(ATTENTION)
    code, changed = merged(source)
    assert not changed
    assert code == textwrap.dedent(source)
