"""A model's weights moved into one block of memory backed by transparent huge pages (Linux).

A decode step reads every weight once; spread over 4 KiB pages, SmolLM2's 84 MB of 4-bit weights cost ~21,000
page-table walks a step, far more pages than the CPU's TLB covers. 2-core AMD EPYC, the integer-group kernel alone
on SmolLM2's weights read from DRAM as in a step: 4.0 -> 3.1 ms at batch 1, 8.2 -> 7.5 ms at batch 8; whole steps,
paired rounds in one process: GGUF Q4_1 kept -7.6% (batch 1) / -3.8% (batch 8), weight_quant int4 -2% / -3%;
the float-rows kernel alone on SmolLM2's 269 MB of bfloat16 weights: 7.2 -> 5.7 ms at ~54 GB/s of DRAM bandwidth.
Most distributions leave huge pages to programs that ask (`madvise` mode); torch's allocator
does not ask, so the weights are copied into a mapping that does, one tensor at a time (the old copy freed as each
moves); each keeps a storage of its own (compiled regions refuse weights that alias one storage). Where the kernel
gives huge pages to everything (`always`), refuses them (`never`), or is not Linux, nothing moves.

Memory that cannot move because others hold it — a frozen graph's own copies of the weights (inductor's GEMM
template packs them into its blocked layout while compiling) — is backed by huge pages where it lies instead
(`MADV_COLLAPSE`, Linux 6.1 and later): SmolLM2 bf16's 269 MB of packed weights, batch-1 step 7.06 -> 6.59 ms
(paired rounds in one process, 2-core AMD EPYC).
"""

from __future__ import annotations

import ctypes
import functools
import logging
import mmap
import threading
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from torch import nn

logger = logging.getLogger(__name__)

HUGE_PAGE = 2 << 20
ALIGNMENT = 64
THP_MODE = Path("/sys/kernel/mm/transparent_hugepage/enabled")
MADV_COLLAPSE = 25  # Linux's generic madvise numbering (x86-64, arm64); Python 3.11's mmap does not name it


def huge_pages_on_request() -> bool:
    """Whether this kernel backs memory with huge pages only where a program asks (madvise)."""
    try:
        return "[madvise]" in THP_MODE.read_text()
    except OSError:
        return False


def _movable(tensor: torch.Tensor) -> bool:
    """A CPU tensor that owns its whole storage, laid out plainly: a view of it can replace it."""
    return (tensor.device.type == "cpu" and tensor.is_contiguous() and tensor.storage_offset() == 0
            and tensor.untyped_storage().nbytes() == tensor.numel() * tensor.element_size())


def place_on_huge_pages(model: nn.Module) -> int:
    """Move the model's parameters and buffers into one huge-page mapping; returns the bytes moved (0: none)."""
    move = HugePageMove.plan(model)
    return 0 if move is None else move.finish()


def _available_memory() -> int:
    try:
        text = Path("/proc/meminfo").read_text()
    except OSError:
        return 0
    return next((int(line.split()[1]) * 1024 for line in text.splitlines() if line.startswith("MemAvailable:")), 0)


class HugePageMove:
    """A model's parameters and buffers bound for one huge-page mapping (`plan`), moved by `finish`.

    The memory can be made ready first, on a thread of its own (`prepare_in_background`): on a virtual machine that
    hands freed memory back to its host, a huge page fresh from the host is slow to touch the first time (SmolLM2's
    538 MB of float32 weights: 4.5 s on a 2-core AMD EPYC VM, where 4 KiB pages take 0.3 s and huge pages freed a
    moment before 0.05 s), time the compile that follows the load can hide."""

    def __init__(self, places: dict[int, list[tuple[dict, str, bool]]], slots: dict[int, tuple[int, int]],
                 total: int):
        self.places, self.slots, self.total = places, slots, total
        # Private: a shared anonymous mapping is shmem, which huge pages do not back by default.
        self.mapping = mmap.mmap(-1, total + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        self.mapping.madvise(mmap.MADV_HUGEPAGE)
        self.address = torch.frombuffer(self.mapping, dtype=torch.uint8, count=1).data_ptr()
        self.preparing: threading.Thread | None = None

    @classmethod
    def plan(cls, model: nn.Module) -> HugePageMove | None:
        """The move of the model's tensors, or None where nothing would move (no madvise-mode huge pages, less than
        one huge page of weights, advice refused)."""
        if not huge_pages_on_request():
            return None
        # Each tensor by its places (a tied weight has two), and its slot (offset, bytes); no reference to the tensor
        # is kept here, so that each old copy is freed as soon as it has moved.
        places: dict[int, list[tuple[dict, str, bool]]] = {}
        slots: dict[int, tuple[int, int]] = {}
        total = 0
        for module in model.modules():
            for is_parameter, table in ((True, module._parameters), (False, module._buffers)):
                for name, tensor in table.items():
                    if tensor is None or tensor.numel() == 0 or not _movable(tensor):
                        continue
                    if id(tensor) not in places:
                        nbytes = tensor.numel() * tensor.element_size()
                        places[id(tensor)], slots[id(tensor)] = [], (total, nbytes)
                        total = -(-(total + nbytes) // ALIGNMENT) * ALIGNMENT
                    places[id(tensor)].append((table, name, is_parameter))
        if total < HUGE_PAGE:
            return None
        try:
            return cls(places, slots, total)
        except (AttributeError, OSError) as error:
            logger.info("huge pages refused (%s): weights stay where they are", error)
            return None

    def prepare_in_background(self) -> bool:
        """Touch the mapping's memory on a thread of its own; False, touching nothing, where the weights would not fit
        in memory twice (they move one tensor at a time otherwise, each old copy freed as it goes)."""
        if _available_memory() < 2 * self.total:
            return False
        # ctypes' memset runs without the GIL: the thread takes no time from the interpreter's own work.
        self.preparing = threading.Thread(target=ctypes.memset, args=(self.address, 0, len(self.mapping)),
                                          name="huge-page-weights", daemon=True)
        self.preparing.start()
        return True

    def finish(self) -> int:
        """Move every planned tensor into the mapping; returns the bytes moved. A tensor replaced since the plan by
        one of another size stays where it is."""
        if self.preparing is not None:
            self.preparing.join()
        start, moved_bytes = -self.address % HUGE_PAGE, 0
        for key, tensor_places in self.places.items():
            table, name, _ = tensor_places[0]
            tensor = table.get(name)
            offset, nbytes = self.slots[key]
            if tensor is None or not _movable(tensor) or tensor.numel() * tensor.element_size() != nbytes:
                continue
            moved = torch.frombuffer(self.mapping, dtype=tensor.dtype, count=tensor.numel(), offset=start + offset)
            moved = moved.view(tensor.shape).copy_(tensor)
            for table, name, is_parameter in tensor_places:
                if is_parameter:
                    table[name].data = moved
                else:
                    table[name] = moved
            moved_bytes += nbytes
            del tensor
        self.places.clear()
        return moved_bytes


@functools.cache
def _madvise() -> Callable[[int, int, int], int]:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return libc.madvise


@functools.cache
def kernel_collapses() -> bool:
    """Whether this kernel collapses memory into huge pages on request (MADV_COLLAPSE, Linux 6.1+): tried on a
    mapping of our own, since an older kernel's "invalid argument" reads like that of a range it cannot collapse."""
    if not huge_pages_on_request():
        return False
    trial = mmap.mmap(-1, 2 * HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        address = ctypes.addressof(ctypes.c_char.from_buffer(trial))
        start = address - address % HUGE_PAGE + HUGE_PAGE
        trial.write(b"\1" * len(trial))
        return _madvise()(start, HUGE_PAGE, MADV_COLLAPSE) == 0
    finally:
        trial.close()


def collapse_into_huge_pages(tensors: Iterable[torch.Tensor]) -> int:
    """Back the memory under `tensors` with huge pages where it lies; returns the bytes now backed (0 where the
    kernel cannot collapse memory, or gives huge pages only to everything or nothing). Every 2 MiB range a tensor's
    storage touches is collapsed whole, so neighbouring allocations in it come along (their contents stay); a range
    reaching past the mapping stays as it is."""
    if not kernel_collapses():
        return 0
    starts: set[int] = set()
    for tensor in tensors:
        storage = tensor.untyped_storage()
        first, end = storage.data_ptr(), storage.data_ptr() + storage.nbytes()
        starts.update(range(first - first % HUGE_PAGE, end, HUGE_PAGE))
    madvise = _madvise()
    return sum(HUGE_PAGE for start in sorted(starts) if madvise(start, HUGE_PAGE, MADV_COLLAPSE) == 0)


def graph_constants_on_huge_pages(compiled: Callable) -> Callable:
    """`compiled` (torch.compile with inductor) collapsing into huge pages the tensors each inductor graph it loads
    holds as constants, once, after the call that compiled or loaded the graph."""
    from torch._inductor.codecache import PyCodeCache

    loaded = len(PyCodeCache.modules)

    @functools.wraps(compiled)
    def run(*args, **kwargs):
        nonlocal loaded
        result = compiled(*args, **kwargs)
        if len(PyCodeCache.modules) != loaded:
            modules, loaded = PyCodeCache.modules[loaded:], len(PyCodeCache.modules)
            constants = [value for module in modules for value in vars(module).values()
                         if isinstance(value, torch.Tensor) and value.device.type == "cpu"
                         and value.layout == torch.strided]
            collapsed = collapse_into_huge_pages(constants)
            if collapsed:
                logger.info("compiled graph constants on huge pages: %.0f MB", collapsed / 1e6)
        return result

    return run
