"""Ascend NPU: the only module that imports torch_npu / torchair. It mirrors the generic backends' calls."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Callable

import torch
import torch_npu  # noqa: F401  registers the "npu" device with torch
import torchair

from core.backends.base import DeviceBackend

ACL_FORMAT_FRACTAL_NZ = 29


class NpuBackend(DeviceBackend):
    name = "npu"
    exe_modes = ("eager", "ge_graph", "acl_graph")
    dist_backend = "hccl"

    @classmethod
    def is_available(cls) -> bool:
        return torch.npu.is_available()

    def set_device(self, local_rank: int) -> None:
        torch.npu.set_device(local_rank)

    def synchronize(self) -> None:
        torch.npu.synchronize()

    def manual_seed(self, seed: int) -> None:
        torch.manual_seed(seed)
        torch.npu.manual_seed_all(seed)

    def cast_weight_format(self, module: torch.nn.Module) -> None:
        for submodule in module.modules():
            if isinstance(submodule, torch.nn.Linear):
                submodule.weight.data = torch_npu.npu_format_cast(submodule.weight.data, ACL_FORMAT_FRACTAL_NZ)

    def _compile_graph(self, forward: Callable, exe_mode: str, float_matmuls: bool,
                       autotune: bool | None) -> Callable:
        # torchair picks its own kernels: compile_autotune is an inductor setting.
        compiler_config = torchair.CompilerConfig()
        compiler_config.experimental_config.frozen_parameter = True
        if exe_mode == "acl_graph":
            compiler_config.mode = "reduce-overhead"
        backend = torchair.get_npu_backend(compiler_config=compiler_config)
        return torch.compile(forward, backend=backend, dynamic=False, fullgraph=True)

    def profiler(self, trace_dir: Path) -> contextlib.AbstractContextManager:
        trace_dir.mkdir(parents=True, exist_ok=True)
        return torch_npu.profiler.profile(
            activities=[torch_npu.profiler.ProfilerActivity.CPU, torch_npu.profiler.ProfilerActivity.NPU],
            on_trace_ready=torch_npu.profiler.tensorboard_trace_handler(str(trace_dir)),
        )
