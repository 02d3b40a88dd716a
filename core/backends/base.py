"""The small interface a device backend implements."""

from __future__ import annotations

import contextlib
import functools
import itertools
import logging
import types
from pathlib import Path
from typing import Callable, ClassVar

import torch

from core.timing import StepTimer

logger = logging.getLogger(__name__)

MAX_GRAPHS_PER_FORWARD = 32


class DeviceBackend:
    name: ClassVar[str]
    exe_modes: ClassVar[tuple[str, ...]]
    dist_backend: ClassVar[str]
    # Graph modes compile the prompt's forward too (bucketed lengths), not only the decode step.
    compiles_prefill: ClassVar[bool] = True
    # A greedy decode step's graph also picks its tokens and writes the next step's inputs (the slot mask updated in
    # place). Proven on CPU; where graphs are replayed (CUDA graphs, ACL graphs), an input updated in place that is
    # not a static buffer would keep the step out of the replayed graph, so there the tokens are chosen outside it.
    greedy_step_in_graph: ClassVar[bool] = False

    @classmethod
    def is_available(cls) -> bool:
        raise NotImplementedError

    def device(self, local_rank: int) -> torch.device:
        return torch.device(self.name, local_rank)

    def set_device(self, local_rank: int) -> None:
        """Bind this process to its accelerator; a no-op where there is only one host device."""

    def synchronize(self) -> None:
        """Wait for queued device work, so that wall-clock timings cover it."""

    def manual_seed(self, seed: int) -> None:
        torch.manual_seed(seed)

    def decode_attention(self, model_attention: str) -> str:
        """The attention implementation compiled decode steps run for a model whose own is `model_attention`."""
        return model_attention

    def prepare_for_graphs(self, model: torch.nn.Module, exe_mode: str, dtype: torch.dtype,
                           float_matmuls: bool = True, autotune: bool | None = None) -> None:
        """Switch what `exe_mode`'s graphs cannot hold to what they can, before the first compile; float_matmuls
        and autotune as `compile` will be given them."""

    def place_weights(self, model: torch.nn.Module) -> None:
        """Put the loaded weights where the device reads them fastest; they stay where they are by default."""

    def step_timer(self) -> StepTimer:
        """A timer for one generation step; its `elapsed_ms` is read after `synchronize()` ends the generation."""
        return StepTimer(self.synchronize)

    def cast_weight_format(self, module: torch.nn.Module) -> None:
        """Convert weights to the device's preferred layout (NZ on Ascend); the generic layout elsewhere."""

    def compile(self, forward: Callable, exe_mode: str, float_matmuls: bool = True,
                autotune: bool | None = None) -> Callable:
        """Wrap a model forward for `exe_mode`; eager returns it unchanged. float_matmuls: the linear layers
        multiply by float weights (False when they run low-bit kernels, see core.quantization.low_bit).
        autotune: tune kernels while compiling (model_config.compile_autotune); None leaves it to the device."""
        if exe_mode == "eager":
            return forward
        # Prefill buckets and the decode step are separate graphs of the same forward: room for all of them.
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, MAX_GRAPHS_PER_FORWARD)
        return self._compile_graph(_own_code(forward), exe_mode, float_matmuls, autotune)

    def compile_greedy_step(self, forward: Callable, model: torch.nn.Module, exe_mode: str,
                            float_matmuls: bool = True, autotune: bool | None = None,
                            ahead_of_time: bool | None = None) -> Callable:
        """`compile` for a whole greedy decode step (ModelRunner.prepared_greedy_step) of `model`. ahead_of_time:
        compile it ahead of time where the device can (model_config.aot_decode_step); None leaves it to the
        device."""
        return self.compile(forward, exe_mode, float_matmuls, autotune)

    def _compile_graph(self, forward: Callable, exe_mode: str, float_matmuls: bool,
                       autotune: bool | None) -> Callable:
        raise NotImplementedError(f"{self.name} has no graph mode {exe_mode}")

    def profiler(self, trace_dir: Path) -> contextlib.AbstractContextManager:
        """A profiler context whose trace lands in `trace_dir` (Perfetto / TensorBoard readable)."""
        activities = [torch.profiler.ProfilerActivity.CPU, *self._profiler_activities()]
        trace_dir.mkdir(parents=True, exist_ok=True)
        return torch.profiler.profile(
            activities=activities,
            record_shapes=True,
            on_trace_ready=torch.profiler.tensorboard_trace_handler(str(trace_dir)),
        )

    def _profiler_activities(self) -> list:
        return []


def one_graph(forward: Callable, options: dict, around_call: Callable[[], contextlib.AbstractContextManager]
              = contextlib.nullcontext) -> Callable:
    """`forward` compiled by inductor (`options`: its config) into one graph whose guards skip the modules, entered
    inside `around_call()`. A port's modules never change after init_model (weights are loaded, split, quantized
    and cast before the first compile), and `forward` has a code object of its own (DeviceBackend.compile), so no
    other model reaches these graphs: dynamo need not re-check every parameter and module attribute before each
    call, which costs ~1.2 ms per SmolLM2 decode step on 2 CPU cores. Inputs, the cache included, stay guarded.
    A forward that does not trace to one graph is compiled again with every guard kept."""

    def build(trust_modules: bool) -> Callable:
        # torch.compile takes guard_filter_fn out of the dict it is given: each compile gets its own.
        compile_options = dict(options)
        if trust_modules:
            compile_options["guard_filter_fn"] = torch.compiler.skip_guard_on_all_nn_modules_unsafe
        return torch.compile(forward, backend="inductor", dynamic=False, fullgraph=trust_modules,
                             options=compile_options)

    compiled = build(trust_modules=True)

    @functools.wraps(forward)
    def run(*args, **kwargs):
        nonlocal compiled
        with around_call():
            try:
                return compiled(*args, **kwargs)
            except torch._dynamo.exc.Unsupported:
                # A graph break: the model's own functions get compiled too, and those are shared with every
                # other model of the class, so their guards on the modules must stay.
                logger.info("the forward does not compile to one graph: modules stay guarded")
                compiled = build(trust_modules=False)
                return compiled(*args, **kwargs)

    return run


_compiled_forwards = itertools.count()


def _own_code(forward: Callable) -> Callable:
    """`forward` called through a function whose code object belongs to this compile alone. Dynamo keeps graphs
    and guards per code object: a model's compiled graphs are then never offered to another model of the same
    class (a second runner in the process), and prefill and decode each scan only their own."""

    def step(*args, **kwargs):
        return forward(*args, **kwargs)

    code = step.__code__.replace(co_name=f"compiled_forward_{next(_compiled_forwards)}")
    return types.FunctionType(code, step.__globals__, code.co_name, None, step.__closure__)
