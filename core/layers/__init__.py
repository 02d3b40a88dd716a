"""Tensor-parallel building blocks the generated models use in place of nn.Linear / nn.Embedding / nn.Parameter."""

from core.distributed import all_reduce
from core.layers.conv import ChannelParallelConv1d
from core.layers.embedding import VocabParallelEmbedding
from core.layers.heads import gather_heads, local_share, over_all_heads, scatter_heads
from core.layers.linear import (
    ColumnParallelLinear,
    MergedColumnParallelLinear,
    ParallelLMHead,
    RowParallelLinear,
)
from core.layers.parameter import local_shard, sharded_parameter
from core.layers.partition import check_partitions, local_heads

__all__ = [
    "ChannelParallelConv1d",
    "ColumnParallelLinear",
    "MergedColumnParallelLinear",
    "ParallelLMHead",
    "RowParallelLinear",
    "VocabParallelEmbedding",
    "all_reduce",
    "check_partitions",
    "gather_heads",
    "local_heads",
    "local_share",
    "local_shard",
    "over_all_heads",
    "scatter_heads",
    "sharded_parameter",
]
