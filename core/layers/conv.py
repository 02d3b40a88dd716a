"""A depthwise causal convolution split by channels (the short convolution of Gated DeltaNet and Mamba mixers).

Each channel is convolved on its own (`groups == channels`), so a rank holds whole channels: those of its heads
in each section of the channel dimension (q | k | v for Gated DeltaNet), read from the checkpoint section by
section, as a merged column-parallel linear reads its segments.
"""

from __future__ import annotations

import torch
from torch import nn

from core.distributed import get_tp_group
from core.layers.linear import load_row_segments
from core.layers.partition import split_evenly, split_heads


class ChannelParallelConv1d(nn.Conv1d):
    """nn.Conv1d(C, C, kernel_size, groups=C) with C = sum(channel_sizes), each section split over `group`:
    evenly, or by whole heads where `num_heads` gives the section's head count."""

    def __init__(self, channel_sizes: list[int], kernel_size: int, bias: bool = True, padding: int = 0,
                 group: str = "attn_tp", num_heads: list[int | None] | None = None,
                 dtype: torch.dtype | None = None):
        tp = get_tp_group(group)
        heads = num_heads or [None] * len(channel_sizes)
        self.segments = [
            split_evenly(size, tp, "channels") if count is None else split_heads(count, size // count, tp)
            for size, count in zip(channel_sizes, heads)
        ]
        channels = sum(segment.local for segment in self.segments)
        super().__init__(channels, channels, kernel_size, groups=channels, padding=padding, bias=bias, dtype=dtype)
        self.tp_group = tp
        self.partition_problem = next((segment.problem for segment in self.segments if segment.problem), None)
        for param in self.parameters():
            param.weight_loader = self.weight_loader

    def weight_loader(self, param: nn.Parameter, loaded) -> None:
        load_row_segments(type(self).__name__, param, loaded, self.segments)
