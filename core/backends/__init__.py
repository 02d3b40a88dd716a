"""Device backends: every device-specific call (sync, seeding, collectives, profiler, graph compile) lives here."""

from __future__ import annotations

import importlib.util

import torch

from core.backends.base import DeviceBackend
from core.backends.cpu import CpuBackend
from core.backends.cuda import CudaBackend
from core.errors import DeviceError

BACKENDS: dict[str, type[DeviceBackend]] = {"cpu": CpuBackend, "cuda": CudaBackend}


def npu_installed() -> bool:
    return importlib.util.find_spec("torch_npu") is not None


def select_backend(device: str, exe_mode: str) -> DeviceBackend:
    """Pick the backend for `model_config.device` and check that it can run `exe_mode`."""
    if device == "auto":
        device = "npu" if npu_installed() else "cuda" if torch.cuda.is_available() else "cpu"
    if device == "npu":
        if not npu_installed():
            raise DeviceError("model_config.device is 'npu' but torch_npu is not installed; use device: auto")
        from core.backends.npu import NpuBackend

        backend_class: type[DeviceBackend] = NpuBackend
    else:
        backend_class = BACKENDS[device]
        if not backend_class.is_available():
            raise DeviceError(f"model_config.device is '{device}' but no {device} device is available here")
    if exe_mode not in backend_class.exe_modes:
        raise DeviceError(
            f"exe_mode '{exe_mode}' cannot run on {device}; modes available on {device}: "
            f"{', '.join(backend_class.exe_modes)}"
        )
    return backend_class()
