"""Integer weights laid out for `int_groups_avx512.cpp`: 16 output rows side by side, blocks of 32 inputs, each block
a record of its codes, float16 scales and (4-bit, unless symmetric) float16 mins, and two groups' records alternating.

Within a block, the kernel multiplies the 16 rows by one pair of inputs per instruction, so each row's pair of codes
sits in one 32-bit lane: row r's codes for inputs (2p, 2p + 1) are lane r of pair p's vector. A thread computes whole
pairs of groups (runs) and reads each run's records front to back, one stream of memory.
"""

from __future__ import annotations

import torch

from core.kernels import GROUP, ROWS

PAIRED_GROUPS = 2


def four_bit_codes(codes: torch.Tensor) -> torch.Tensor:
    """Codes 0..15 [out, in] → uint8 [out/16, in/32, 256]: per block, 4 chunks of 64 bytes; chunk j's lower nibbles
    hold pairs 4j and 4j+1, its upper nibbles pairs 4j+2 and 4j+3, in the byte order AVX-512's unpacklo / unpackhi
    with 128-bit lanes expand: byte 16·(r // 4) + 8·h + 2·(r % 4) + e holds row r, input 2·(pair) + e."""
    rows, columns = codes.shape
    # dims: group, row lane (r // 4), row in lane (r % 4), block, chunk j, nibble s, unpack half h, element e
    split = codes.to(torch.uint8).reshape(rows // ROWS, 4, 4, columns // GROUP, 4, 2, 2, 2)
    ordered = split.permute(0, 3, 4, 5, 1, 6, 2, 7)
    return (ordered[:, :, :, 0] | (ordered[:, :, :, 1] << 4)).reshape(rows // ROWS, columns // GROUP, 256).contiguous()


def eight_bit_codes(codes: torch.Tensor) -> torch.Tensor:
    """Codes −128..127 [out, in] → their bytes [out/16, in/32, 512]: per block, 16 chunks of 32 bytes, chunk p
    holding inputs (2p, 2p + 1) of rows 0..15."""
    rows, columns = codes.shape
    split = codes.to(torch.int8).reshape(rows // ROWS, ROWS, columns // GROUP, GROUP // 2, 2)
    return split.permute(0, 2, 3, 1, 4).reshape(rows // ROWS, columns // GROUP, 512).contiguous().view(torch.uint8)


def block_halves(values: torch.Tensor) -> torch.Tensor:
    """Per-block values [out, in/32] → the bytes of their float16s [out/16, in/32, 32]."""
    rows, blocks = values.shape
    halves = values.to(torch.float16).reshape(rows // ROWS, ROWS, blocks).transpose(1, 2).contiguous()
    return halves.view(torch.uint8)


def records(parts: list[torch.Tensor]) -> torch.Tensor:
    """Per-block parts [groups, blocks, bytes] → uint8 [groups · blocks, record]: each run of two groups (the last
    run one group when their number is odd) block by block, the run's groups alternating."""
    joined = torch.cat(parts, dim=-1)
    groups, blocks, record = joined.shape
    paired = groups - groups % PAIRED_GROUPS
    runs = joined[:paired].reshape(paired // PAIRED_GROUPS, PAIRED_GROUPS, blocks, record).transpose(1, 2)
    return torch.cat((runs.reshape(-1, record), joined[paired:].reshape(-1, record))).contiguous()


def four_bit_layout(codes: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor) -> torch.Tensor:
    """Codes 0..15 [out, in], scales and mins per block [out, in/32] → the 4-bit kernel's weight."""
    return records([four_bit_codes(codes), block_halves(scales), block_halves(mins)])


def symmetric_four_bit_layout(codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """Codes 0..15 [out, in] of the values scale · (code − 8) (llama.cpp's Q4_0), scales per block [out, in/32] →
    the symmetric 4-bit kernel's weight: no mins."""
    return records([four_bit_codes(codes), block_halves(scales)])


def eight_bit_layout(codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """Codes −128..127 [out, in], scales per block [out, in/32] → the 8-bit kernel's weight."""
    return records([eight_bit_codes(codes), block_halves(scales)])


RUN_ROWS = 32
FLOAT_STEP = {torch.bfloat16: 2, torch.float32: 1}


def float_rows_layout(weight: torch.Tensor) -> torch.Tensor:
    """A float weight [out, in] (out a multiple of 16) → flat, for `float_rows_avx512.cpp`: runs of 32 rows (16 in
    the last when out is an odd number of 16s), each run input step by input step (a pair of bfloat16 inputs, or one
    float32 input), the run's rows side by side within a step."""
    step = FLOAT_STEP[weight.dtype]
    whole = weight.shape[0] - weight.shape[0] % RUN_ROWS
    runs = [weight[:whole].unflatten(0, (-1, RUN_ROWS)), weight[whole:].unsqueeze(0)]
    return torch.cat([run.unflatten(2, (-1, step)).transpose(1, 2).reshape(-1) for run in runs])

