"""A greedy decode step compiled ahead of time by AOTInductor: one C++ function calls the step's kernels.

A step compiled by torch.compile runs from Python: each call, dynamo fetches and guards the ~300 weights it takes as
inputs and inductor's wrapper calls every kernel through the interpreter, with code and objects the step's weights
have just flushed from the caches (SmolLM2 bf16 batch 1 on 2 AMD EPYC cores, under `perf`: ~2 ms of a 7.2 ms step
besides the products). Exported (`torch.export`) and compiled by AOTInductor, the step is a library whose C++
wrapper calls the kernels; the weights and the static KV cache are handed to it as its constants, user-managed, so
it reads the model's tensors and writes the cache in place, nothing copied. Paired in one process against the
torch.compile step: SmolLM2 bf16 batch 1 9.23 against 10.07 ms (82% of the roofline against 75%, host at ~35 GB/s),
`weight_quant: int4` batch 1 3.31 against 4.61 ms, the same tokens; batch 8 7.77 against 8.91 (one row of eight
takes another token at a near-tie). The wrapper calls our kernels through their C entry points
(`core/kernels/aoti_shim.h`), not AOTInductor's proxy executor, which boxes each call's arguments and dispatches by
name (paired, int4 batch 1: 3.5% a step; bf16 batch 1 0.8%, int4 batch 8 1.6%).

The library is compiled once per exported graph and kept with inductor's caches (`cache_dir()`), keyed by the
graph's code, the shapes of its constants and inputs, the compile options and the torch and kernel versions: a later
process exports the step again (~4 s for SmolLM2) and loads the library (~0.1 s). A step that does not export, or a
cache with recurrent states, stays on torch.compile with one log line.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch._inductor.runtime.cache_dir_utils import cache_dir as inductor_cache_dir

from core.backends.repeated_blocks import blocks_inlined
from core.kernels import built_library, cpu_kernels
from core.kv_cache import StaticKVCache

logger = logging.getLogger(__name__)

GreedyStep = Callable[[dict[str, Any], torch.Tensor, int], tuple[torch.Tensor, torch.Tensor]]


def cache_dir() -> Path:
    """Beside inductor's own caches (TORCHINDUCTOR_CACHE_DIR): cleared with them, and a fresh one compiles again."""
    return Path(inductor_cache_dir()) / "recipes_scaffold_aot_steps"


class AotGreedyStep:
    """`forward(input_dict, finished, pad_token_id)` (ModelRunner.prepared_greedy_step) run as an AOTInductor
    library, one per input signature; `fallback` (the same step under torch.compile) where it cannot be."""

    # Libraries this process has exported and loaded: each is a compiled graph, as torch.compile's are counted
    # (core.model_runner.compiled_graphs).
    loaded = 0

    def __init__(self, forward: GreedyStep, model: nn.Module, fallback: GreedyStep, options: dict[str, Any],
                 before_loading: Callable[[], None] = lambda: None):
        """before_loading: runs before the library takes the model's tensors as its constants (the weights' move
        onto huge pages replaces them)."""
        self.forward, self.model, self.fallback, self.options = forward, model, fallback, options
        self.before_loading = before_loading
        self.steps: dict[tuple, Callable | None] = {}

    def __call__(self, input_dict: dict[str, Any], finished: torch.Tensor,
                 pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
        signature = (pad_token_id, tuple(finished.shape), tuple(
            (name, tuple(value.shape), value.dtype) for name, value in input_dict.items()
            if isinstance(value, torch.Tensor)))
        if signature not in self.steps:
            self.steps[signature] = self._build(input_dict, finished, pad_token_id)
        step = self.steps[signature]
        if step is None:
            return self.fallback(input_dict, finished, pad_token_id)
        return step(input_dict, finished)

    def _build(self, input_dict: dict[str, Any], finished: torch.Tensor, pad_token_id: int) -> Callable | None:
        problem = unsupported(input_dict)
        if problem is not None:
            logger.info("the decode step stays on torch.compile: %s", problem)
            return None
        try:
            return self._compiled(input_dict, finished, pad_token_id)
        except Exception as error:  # noqa: BLE001 - any export or compile failure leaves torch.compile's step
            first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            logger.warning("the decode step stays on torch.compile: AOTInductor could not compile it (%s)",
                           first_line)
            return None

    def _compiled(self, input_dict: dict[str, Any], finished: torch.Tensor, pad_token_id: int) -> Callable:
        names = [name for name, value in input_dict.items() if isinstance(value, torch.Tensor)]
        absent = [name for name, value in input_dict.items() if value is None]
        cache_name, cache = next((name, value) for name, value in input_dict.items()
                                 if isinstance(value, StaticKVCache))
        step = _ExportedStep(self.forward, self.model, names, absent, cache_name, cache, pad_token_id)
        with torch.inference_mode(False), blocks_inlined(self.model):
            # Export writes the cache and the inputs it mutates on copies: inference tensors take no such writes.
            step.hold_copies()
            inputs = tuple(input_dict[name].clone() for name in names) + (finished.clone(),)
            try:
                exported = torch.export.export(step, inputs, strict=False)
            finally:
                step.release_copies()
        # The options hold what skips inductor's instruction-set checks where this machine passed them (a new
        # process loading the library ran them otherwise: ~5 s of test compiles).
        with warnings.catch_warnings(), torch._inductor.config.patch(self.options):
            # torch 2.13 pickles the graph's tree specs through a deprecated path, warning once per process
            warnings.filterwarnings("ignore", message=".*LeafSpec.*", category=FutureWarning)
            package = self._package(exported)
            compiled = torch._inductor.aoti_load_package(str(package))
        self.before_loading()
        # Ours first (the cache's real buffers, not export's copies); then what export lifted out of the step
        # (tensors the step makes from constants), all held by the loaded step.
        constants = {**exported.constants, **step.constants()}
        held = {fqn: constants[fqn] for fqn in compiled.get_constant_fqns()}
        compiled.load_constants(held, check_full_update=True, user_managed=True)
        logger.info("decode step compiled ahead of time: %s", package.name)
        AotGreedyStep.loaded += 1
        return _LoadedStep(compiled, names, held)

    def _package(self, exported: torch.export.ExportedProgram) -> Path:
        """The library for `exported`, compiled into the cache unless it is there."""
        key = hashlib.sha256()
        key.update(exported.graph_module.code.encode())
        held = sorted({**exported.state_dict, **exported.constants}.items())
        for name, tensor in held + list(enumerate(exported.example_inputs[0])):
            key.update(f"{name}:{tuple(tensor.shape)}:{tensor.stride()}:{tensor.dtype}".encode())
        key.update(repr(sorted(self.options.items())).encode())
        key.update(torch.__version__.encode())
        if cpu_kernels() is None:
            key.update(built_library().name.encode())
        package = cache_dir() / f"{key.hexdigest()[:24]}.pt2"
        if package.exists():
            return package
        package.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=package.parent) as scratch:
            partial = Path(scratch) / package.name
            with torch._inductor.config.patch({"aot_inductor.package_constants_in_so": False}):
                torch._inductor.aoti_compile_and_package(exported, package_path=str(partial),
                                                         inductor_configs=self.options)
            os.replace(partial, package)
        return package


class _LoadedStep:
    """The library with its constants, which it reads and writes in place (so they are held here)."""

    def __init__(self, compiled: Any, names: list[str], constants: dict[str, torch.Tensor]):
        self.compiled, self.names, self.constants = compiled, names, constants

    def __call__(self, current: dict[str, Any], finished: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # The loader's own entry: the step's inputs and outputs are flat lists of tensors already, and calling the
        # compiled model parses its input and output specs from their text again every call (~0.1 ms a step).
        inputs = [current[name] for name in self.names] + [finished]
        logits, next_tokens, *updated = self.compiled.loader.boxed_run(inputs)
        current.update(zip(self.names, updated))
        return logits, next_tokens


def unsupported(input_dict: dict[str, Any]) -> str | None:
    """Why the step's inputs cannot go through export, or None: one static KV cache holding keys and values only
    (the library takes its tensors as constants), every other input a tensor."""
    caches = [value for value in input_dict.values() if isinstance(value, StaticKVCache)]
    others = [name for name, value in input_dict.items()
              if not isinstance(value, (torch.Tensor, StaticKVCache)) and value is not None]
    if len(caches) != 1:
        return f"{len(caches)} static KV caches among its inputs (takes one)"
    if others:
        return f"inputs that are not tensors: {', '.join(others)}"
    cache = caches[0]
    if cache.has_recurrent_states or any(keys is not None for keys in cache.indexer_keys):
        return "its cache holds recurrent states or indexer keys"
    if any(keys is None for keys in cache.keys) or any(values is None for values in cache.values):
        return "its cache has layers without keys or values"
    return None


class _ExportedStep(nn.Module):
    """The step as a module export can trace: the model's weights and the cache's tensors are its state."""

    def __init__(self, forward: GreedyStep, model: nn.Module, names: list[str], absent: list[str], cache_name: str,
                 cache: StaticKVCache, pad_token_id: int):
        super().__init__()
        self.step, self.model, self.names, self.absent = forward, model, names, absent
        self.cache_name, self.cache, self.pad_token_id = cache_name, cache, pad_token_id
        self.cache_tensors = {**{f"cache_keys_{index}": keys for index, keys in enumerate(cache.keys)},
                              **{f"cache_values_{index}": values for index, values in enumerate(cache.values)},
                              "cache_write_slots": cache.write_slots}

    def hold_copies(self) -> None:
        for name, tensor in self.cache_tensors.items():
            self.register_buffer(name, tensor.clone(), persistent=False)

    def release_copies(self) -> None:
        for name in self.cache_tensors:
            del self._buffers[name]
        self._rebind(self.cache_tensors)

    def constants(self) -> dict[str, torch.Tensor]:
        """Every constant the library reads, by its name in the exported program: our own tensors."""
        held = dict(self.model.named_parameters(prefix="model", remove_duplicate=False))
        held.update(self.model.named_buffers(prefix="model", remove_duplicate=False))
        return {**held, **self.cache_tensors}

    def _rebind(self, tensors: dict[str, torch.Tensor]) -> None:
        layers = len(self.cache.keys)
        self.cache.keys = [tensors[f"cache_keys_{index}"] for index in range(layers)]
        self.cache.values = [tensors[f"cache_values_{index}"] for index in range(layers)]
        self.cache.write_slots = tensors["cache_write_slots"]

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        self._rebind({name: getattr(self, name) for name in self.cache_tensors})
        input_dict = {**dict(zip(self.names, inputs[:-1])), **dict.fromkeys(self.absent), self.cache_name: self.cache}
        logits, next_tokens = self.step(input_dict, inputs[-1], self.pad_token_id)
        # The step replaces some inputs (the next tokens, positions) and writes others in place (the attention
        # mask): every one comes back, as the next step's.
        return (logits, next_tokens, *(input_dict[name] for name in self.names))
