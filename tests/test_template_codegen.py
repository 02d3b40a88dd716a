"""A tuned (frozen, max-autotuned) CPU graph parses each of the GEMM template's sources once per process, not once
per matrix product it generates (core.backends.template_codegen), and computes what the model computes."""

import collections

import jinja2
import torch
import torch._inductor.compile_fx  # noqa: F401  (inductor's own templates, parsed as it is imported)
from torch import nn

from core.backends.cpu import CpuBackend


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.up, self.down, self.out = nn.Linear(64, 128), nn.Linear(128, 64), nn.Linear(64, 128)

    def forward(self, x):
        return self.out(torch.relu(self.down(torch.relu(self.up(x)))))


def test_tuned_graph_parses_each_template_source_once(monkeypatch):
    parsed = collections.Counter()
    from_string = jinja2.Environment.from_string

    def counting(self, source, *args, **kwargs):
        parsed[source] += 1
        return from_string(self, source, *args, **kwargs)

    monkeypatch.setattr(jinja2.Environment, "from_string", counting)
    torch.manual_seed(0)
    model, x = _Block().eval(), torch.randn(2, 64)
    with torch.inference_mode():
        expected = model(x)
        compiled = CpuBackend().compile(model.forward, "inductor")
        assert torch.allclose(compiled(x), expected, atol=1e-4)

    assert parsed, "the tuned graph rendered no GEMM template"
    assert max(parsed.values()) == 1, f"template sources parsed again: {sorted(parsed.values())}"
