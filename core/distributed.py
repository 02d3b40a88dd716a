"""Process groups for tensor parallelism: attn_tp, moe_tp, lmhead_tp, embed_tp, each of consecutive ranks.

torchrun starts the processes (it is the distributed engine); `init_parallel_groups` builds the groups from its
environment. Layers look their group up by name (`get_tp_group("attn_tp")`), so model code names the group it
shards over and nothing else.
"""

from __future__ import annotations

import atexit
import contextlib
import os
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.distributed as dist


GROUP_NAMES = ("attn_tp", "moe_tp", "lmhead_tp", "embed_tp")


@dataclass(frozen=True)
class LaunchEnvironment:
    rank: int
    local_rank: int
    world_size: int

    @classmethod
    def from_torchrun(cls) -> "LaunchEnvironment":
        return cls(int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0)),
                   int(os.environ.get("WORLD_SIZE", 1)))


@dataclass(frozen=True)
class TensorParallelGroup:
    """One rank's view of a tensor-parallel group: its size, its rank inside it, the communicator."""

    name: str
    size: int = 1
    rank: int = 0
    process_group: dist.ProcessGroup | None = None

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.size == 1:
            return tensor
        dist.all_reduce(tensor, group=self.process_group)
        return tensor

    def all_gather(self, tensor: torch.Tensor, dim: int = -1) -> torch.Tensor:
        if self.size == 1:
            return tensor
        parts = [torch.empty_like(tensor) for _ in range(self.size)]
        dist.all_gather(parts, tensor.contiguous(), group=self.process_group)
        return torch.cat(parts, dim=dim)


_groups: dict[str, TensorParallelGroup] = {}


def get_tp_group(name: str) -> TensorParallelGroup:
    if name not in GROUP_NAMES:
        raise ValueError(f"unknown tensor-parallel group '{name}'; groups are {', '.join(GROUP_NAMES)}")
    return _groups.get(name, TensorParallelGroup(name))


def all_reduce(tensor: torch.Tensor, group: str) -> torch.Tensor:
    """Sum a partial result (e.g. a rank's share of the experts' output) over the named group."""
    return get_tp_group(group).all_reduce(tensor)


# One process group per set of ranks, made once per process: a gloo group keeps connection threads of its own, and a
# process that builds runner after runner (the test session's shared torchrun launch) piled up hundreds of them.
_made_groups: dict[tuple[int, ...], dist.ProcessGroup] = {}


def _group_of(ranks: list[int]) -> dist.ProcessGroup:
    if tuple(ranks) not in _made_groups:
        _made_groups[tuple(ranks)] = dist.new_group(ranks)
    return _made_groups[tuple(ranks)]


def init_parallel_groups(parallel_config: dict[str, int], launch: LaunchEnvironment, backend: str) -> None:
    if launch.world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend=backend, rank=launch.rank, world_size=launch.world_size)
        atexit.register(dist.destroy_process_group)
        _made_groups.clear()
    _groups.clear()
    for name in GROUP_NAMES:
        size = parallel_config[f"{name}_size"]
        mine = None
        for start in range(0, launch.world_size, size):
            ranks = list(range(start, start + size))
            # Every rank must take part in creating every group, its own or not.
            group = _group_of(ranks) if size > 1 else None
            if launch.rank in ranks:
                mine = group
        _groups[name] = TensorParallelGroup(name, size, launch.rank % size, mine)


@contextlib.contextmanager
def simulated_rank(parallel_config: dict[str, int], rank: int) -> Iterator[None]:
    """Build layers as rank `rank` would, in one process and without communicators (offline weight splitting)."""
    saved = dict(_groups)
    _groups.clear()
    for name in GROUP_NAMES:
        size = parallel_config[f"{name}_size"]
        _groups[name] = TensorParallelGroup(name, size, rank % size, None)
    try:
        yield
    finally:
        _groups.clear()
        _groups.update(saved)
