"""Tensor-parallel building blocks the generated models use in place of nn.Linear / nn.Embedding / nn.Parameter."""

from core.distributed import all_reduce
from core.layers.embedding import VocabParallelEmbedding
from core.layers.heads import gather_heads, scatter_heads
from core.layers.linear import (
    ColumnParallelLinear,
    MergedColumnParallelLinear,
    ParallelLMHead,
    RowParallelLinear,
)
from core.layers.parameter import sharded_parameter
from core.layers.partition import check_partitions, local_heads

__all__ = [
    "ColumnParallelLinear",
    "MergedColumnParallelLinear",
    "ParallelLMHead",
    "RowParallelLinear",
    "VocabParallelEmbedding",
    "all_reduce",
    "check_partitions",
    "gather_heads",
    "local_heads",
    "scatter_heads",
    "sharded_parameter",
]
