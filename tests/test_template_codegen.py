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
    """Sources parsed by an earlier compile in this process are not parsed again at all."""
    parsed, rendered = collections.Counter(), collections.Counter()
    from_string, render = jinja2.Environment.from_string, jinja2.Template.render

    def counting_parses(self, source, *args, **kwargs):
        parsed[source] += 1
        return from_string(self, source, *args, **kwargs)

    def counting_renders(self, *args, **kwargs):
        rendered[self] += 1
        return render(self, *args, **kwargs)

    monkeypatch.setattr(jinja2.Environment, "from_string", counting_parses)
    monkeypatch.setattr(jinja2.Template, "render", counting_renders)
    torch.manual_seed(0)
    model, x = _Block().eval(), torch.randn(2, 64)
    with torch.inference_mode():
        expected = model(x)
        compiled = CpuBackend().compile(model.forward, "inductor", autotune=True)
        assert torch.allclose(compiled(x), expected, atol=1e-4)

    assert rendered, "the tuned graph rendered no GEMM template"
    assert max(parsed.values(), default=0) <= 1, f"template sources parsed again: {sorted(parsed.values())}"


def test_products_of_one_row_take_the_template_without_timing_and_wider_ones_are_timed():
    """Timing compiles a library per C++ template candidate (core.backends.gemm_choices): a decode step of one
    sequence skips it, one of four rows still times the template against oneDNN."""
    from torch._dynamo.utils import counters

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(96, 160), nn.ReLU(), nn.Linear(160, 96)).eval()
    timed = {}
    for rows in (1, 4):
        x = torch.randn(1, rows, 96)
        counters["inductor"].clear()
        # no timings read from earlier runs' cache
        with torch.inference_mode(), torch._inductor.config.patch(autotune_local_cache=False):
            compiled = CpuBackend().compile(model.forward, "inductor", autotune=True)
            assert torch.allclose(compiled(x), model(x), atol=1e-4)
        timed[rows] = counters["inductor"]["select_algorithm_autotune"]
    assert timed == {1: 0, 4: 2}
