"""Vocabulary-parallel embedding: each rank holds a block of rows, looks up the ids that fall in it, and the
group sums the (otherwise zero) results."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from core.distributed import get_tp_group
from core.errors import CheckpointError
from core.layers.partition import split_evenly, take, tensor_shape


class VocabParallelEmbedding(nn.Embedding):
    def __init__(self, num_embeddings: int, embedding_dim: int, padding_idx: int | None = None,
                 group: str = "embed_tp", dtype: torch.dtype | None = None):
        tp = get_tp_group(group)
        segment = split_evenly(num_embeddings, tp, "vocabulary")
        local_padding = None
        if padding_idx is not None and segment.start <= padding_idx < segment.start + segment.local:
            local_padding = padding_idx - segment.start
        super().__init__(segment.local, embedding_dim, padding_idx=local_padding, dtype=dtype)
        self.tp_group = tp
        self.segment = segment
        self.full_num_embeddings = num_embeddings
        self.partition_problem = segment.problem
        self.weight.weight_loader = self.weight_loader

    def weight_loader(self, param: nn.Parameter, loaded) -> None:
        expected = (self.full_num_embeddings, self.embedding_dim)
        if tensor_shape(loaded) != expected:
            raise CheckpointError(f"VocabParallelEmbedding: checkpoint tensor of shape "
                                  f"{list(tensor_shape(loaded))} does not fit {list(expected)}")
        param.data.copy_(take(loaded, 0, self.segment.start, self.segment.local))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.tp_group.size == 1:
            return super().forward(input_ids)
        local_ids = input_ids - self.segment.start
        outside = (local_ids < 0) | (local_ids >= self.segment.local)
        embeddings = F.embedding(local_ids.masked_fill(outside, 0), self.weight)
        embeddings = embeddings.masked_fill(outside.unsqueeze(-1), 0)
        return self.tp_group.all_reduce(embeddings)
