"""Run under torchrun (gloo): every parallel layer, loaded from safetensors slices, against the plain layer on
the full weights. Rank 0 prints one JSON line: {case: max_abs_diff}."""

import json
import os
import sys
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file

from core.distributed import LaunchEnvironment, get_tp_group, init_parallel_groups
from core.layers import (
    ChannelParallelConv1d,
    ColumnParallelLinear,
    MergedColumnParallelLinear,
    ParallelLMHead,
    RowParallelLinear,
    VocabParallelEmbedding,
    check_partitions,
    local_shard,
    sharded_parameter,
)
from core.safetensors_reader import SafetensorsCheckpoint
from core.weights import held_whole

HIDDEN, HEAD_DIM, HEADS, INTERMEDIATE, VOCAB = 32, 8, 4, 24, 40


def main() -> None:
    launch = LaunchEnvironment.from_torchrun()
    sizes = {f"{group}_size": launch.world_size for group in ("attn_tp", "moe_tp", "lmhead_tp", "embed_tp")}
    init_parallel_groups(sizes, launch, "gloo")
    tp = get_tp_group("attn_tp")
    torch.manual_seed(0)
    full = {
        "w": torch.randn(HEADS * HEAD_DIM, HIDDEN), "b": torch.randn(HEADS * HEAD_DIM),
        "kv1_w": torch.randn(HEAD_DIM, HIDDEN), "kv1_b": torch.randn(HEAD_DIM),
        "o_w": torch.randn(HIDDEN, HEADS * HEAD_DIM), "o_b": torch.randn(HIDDEN),
        "gate_w": torch.randn(INTERMEDIATE, HIDDEN), "gate_b": torch.randn(INTERMEDIATE),
        "up_w": torch.randn(INTERMEDIATE, HIDDEN), "up_b": torch.randn(INTERMEDIATE),
        "q_w": torch.randn(HEADS * HEAD_DIM, HIDDEN), "q_b": torch.randn(HEADS * HEAD_DIM),
        "k_w": torch.randn(HEAD_DIM, HIDDEN), "k_b": torch.randn(HEAD_DIM),
        "v_w": torch.randn(HEAD_DIM, HIDDEN), "v_b": torch.randn(HEAD_DIM),
        "embed": torch.randn(VOCAB, HIDDEN),
        "experts": torch.randn(3, HIDDEN, 2 * INTERMEDIATE), "experts_bias": torch.randn(3, HIDDEN),
        # A depthwise convolution over q | k | v channels (Gated DeltaNet): sections of 2, 2 and 4 heads.
        "conv_w": torch.randn(8 * HEAD_DIM, 1, 4), "conv_b": torch.randn(8 * HEAD_DIM),
        "per_head": torch.randn(HEADS),
    }
    full["gate_transposed_w"] = full["gate_w"].t().contiguous()  # GPT-2's Conv1D stores [in, out]
    full["o_transposed_w"] = full["o_w"].t().contiguous()
    full["gate_up_w"] = torch.cat([full["gate_w"], full["up_w"]])
    full["gate_up_b"] = torch.cat([full["gate_b"], full["up_b"]])
    full["gate_up_interleaved_w"] = torch.stack([full["gate_w"], full["up_w"]], dim=1).reshape(-1, HIDDEN)
    full["gate_up_interleaved_b"] = torch.stack([full["gate_b"], full["up_b"]], dim=1).reshape(-1)
    full["qkv_w"] = torch.cat([full["q_w"], full["k_w"], full["v_w"]])
    full["qkv_b"] = torch.cat([full["q_b"], full["k_b"], full["v_b"]])
    x = torch.randn(3, 5, HIDDEN)
    ids = torch.tensor([[0, 1, 19, 20, 39], [5, 25, 38, 2, 21]])

    path = Path(tempfile.gettempdir()) / f"tp_layers_{os.getpid()}.safetensors"
    save_file(full, str(path))
    results = {}
    with safe_open(str(path), framework="pt") as checkpoint:

        def load(layer, weight, bias=None, shard_id=None):
            extra = () if shard_id is None else (shard_id,)
            layer.weight.weight_loader(layer.weight, checkpoint.get_slice(weight), *extra)
            if bias is not None:
                layer.bias.weight_loader(layer.bias, checkpoint.get_slice(bias), *extra)
            return layer

        def column_case(name, layer, expected):
            results[name] = (tp.all_gather(layer(x)) - expected).abs().max().item()

        def gathered_segments(output, local_sizes):
            # Regroup gathered [rank0 seg0|seg1, rank1 seg0|seg1] into [seg0 all ranks | seg1 all ranks].
            parts = output.split(sum(local_sizes), dim=-1)
            return torch.cat([torch.cat([p.split(local_sizes, dim=-1)[i] for p in parts], dim=-1)
                              for i in range(len(local_sizes))], dim=-1)

        column_case("column", load(ColumnParallelLinear(HIDDEN, HEADS * HEAD_DIM), "w", "b"),
                    F.linear(x, full["w"], full["b"]))
        column_case("column_by_heads",
                    load(ColumnParallelLinear(HIDDEN, HEADS * HEAD_DIM, num_heads=HEADS), "w", "b"),
                    F.linear(x, full["w"], full["b"]))
        replicated = load(ColumnParallelLinear(HIDDEN, HEAD_DIM, num_heads=1), "kv1_w", "kv1_b")
        results["column_kv_head_replicated"] = (replicated(x) - F.linear(x, full["kv1_w"], full["kv1_b"])).abs().max().item()

        row = load(RowParallelLinear(HEADS * HEAD_DIM, HIDDEN, num_heads=HEADS), "o_w", "o_b")
        x_heads = torch.randn(3, 5, HEADS * HEAD_DIM)
        local = x_heads.chunk(tp.size, dim=-1)[tp.rank]
        results["row_bias_once"] = (row(local) - F.linear(x_heads, full["o_w"], full["o_b"])).abs().max().item()

        local_sizes = [INTERMEDIATE // tp.size] * 2
        expected_gate_up = torch.cat([F.linear(x, full["gate_w"], full["gate_b"]),
                                      F.linear(x, full["up_w"], full["up_b"])], dim=-1)
        fused = load(MergedColumnParallelLinear(HIDDEN, [INTERMEDIATE, INTERMEDIATE]), "gate_up_w", "gate_up_b")
        results["merged_fused_on_disk"] = (gathered_segments(tp.all_gather(fused(x)), local_sizes)
                                           - expected_gate_up).abs().max().item()
        separate = MergedColumnParallelLinear(HIDDEN, [INTERMEDIATE, INTERMEDIATE])
        load(separate, "gate_w", "gate_b", shard_id=0)
        load(separate, "up_w", "up_b", shard_id=1)
        results["merged_separate_on_disk"] = (gathered_segments(tp.all_gather(separate(x)), local_sizes)
                                              - expected_gate_up).abs().max().item()
        interleaved = load(MergedColumnParallelLinear(HIDDEN, [INTERMEDIATE, INTERMEDIATE], interleaved=True),
                           "gate_up_interleaved_w", "gate_up_interleaved_b")
        out = tp.all_gather(interleaved(x))
        results["merged_interleaved_on_disk"] = (torch.cat([out[..., ::2], out[..., 1::2]], dim=-1)
                                                 - expected_gate_up).abs().max().item()

        def qkv_layer():
            # As the generator merges q_proj, k_proj, v_proj: q heads split, the single KV head replicated.
            return MergedColumnParallelLinear(HIDDEN, [HEADS * HEAD_DIM, HEAD_DIM, HEAD_DIM], group="attn_tp",
                                              num_heads=[HEADS, 1, 1])

        qkv_local = [HEADS * HEAD_DIM // tp.size, HEAD_DIM, HEAD_DIM]
        expected_qkv = F.linear(x, full["qkv_w"], full["qkv_b"])
        qkv = load(qkv_layer(), "qkv_w", "qkv_b")
        q, k, v = qkv(x).split(qkv_local, dim=-1)
        results["qkv_fused_on_disk"] = max(
            (tp.all_gather(q) - expected_qkv[..., : HEADS * HEAD_DIM]).abs().max().item(),
            (k - expected_qkv[..., HEADS * HEAD_DIM : HEADS * HEAD_DIM + HEAD_DIM]).abs().max().item(),
            (v - expected_qkv[..., -HEAD_DIM:]).abs().max().item(),
        )
        qkv_separate = qkv_layer()
        for shard_id, name in enumerate("qkv"):
            load(qkv_separate, f"{name}_w", f"{name}_b", shard_id=shard_id)
        results["qkv_separate_on_disk"] = (qkv_separate(x) - qkv(x)).abs().max().item()

        embedding = load(VocabParallelEmbedding(VOCAB, HIDDEN, padding_idx=0), "embed")
        results["vocab_embedding"] = (embedding(ids) - F.embedding(ids, full["embed"])).abs().max().item()
        lm_head = load(ParallelLMHead(HIDDEN, VOCAB, bias=False), "embed")
        results["lm_head_gathered"] = (lm_head(x) - F.linear(x, full["embed"])).abs().max().item()

        transposed = load(ColumnParallelLinear(HIDDEN, INTERMEDIATE, group="moe_tp", checkpoint_transposed=True),
                          "gate_transposed_w", "gate_b")
        column_case("column_transposed_on_disk", transposed, F.linear(x, full["gate_w"], full["gate_b"]))
        row_transposed = load(RowParallelLinear(HEADS * HEAD_DIM, HIDDEN, num_heads=HEADS, checkpoint_transposed=True),
                              "o_transposed_w", "o_b")
        row_input = torch.randn(3, 5, HEADS * HEAD_DIM)
        local_input = row_input.chunk(tp.size, dim=-1)[tp.rank]
        results["row_transposed_on_disk"] = (row_transposed(local_input)
                                             - F.linear(row_input, full["o_w"], full["o_b"])).abs().max().item()

        sections = [2 * HEAD_DIM, 2 * HEAD_DIM, 4 * HEAD_DIM]
        conv = load(ChannelParallelConv1d(sections, kernel_size=4, padding=3, num_heads=[2, 2, 4]), "conv_w", "conv_b")
        signal = torch.randn(2, 8 * HEAD_DIM, 6)
        expected = F.conv1d(signal, full["conv_w"], full["conv_b"], padding=3, groups=8 * HEAD_DIM)
        rank_channels = torch.cat([part.chunk(tp.size, dim=1)[tp.rank]
                                   for part in signal.split(sections, dim=1)], dim=1)
        expected_channels = torch.cat([part.chunk(tp.size, dim=1)[tp.rank]
                                       for part in expected.split(sections, dim=1)], dim=1)
        results["conv_channels_by_section"] = (conv(rank_channels) - expected_channels).abs().max().item()

        per_head = local_shard(torch.nn.Parameter(torch.empty(HEADS // tp.size)), group="attn_tp")
        per_head.weight_loader(per_head, checkpoint.get_slice("per_head"))
        results["local_shard"] = (per_head - full["per_head"].chunk(tp.size)[tp.rank]).abs().max().item()

        experts = sharded_parameter((3, HIDDEN, 2 * INTERMEDIATE), group="moe_tp", dim=2)
        experts.weight_loader(experts, checkpoint.get_slice("experts"))
        expected = full["experts"].chunk(tp.size, dim=2)[tp.rank]
        results["sharded_parameter_dim2"] = (experts - expected).abs().max().item()
        bias = sharded_parameter((3, HIDDEN), group="moe_tp", summand=True)
        bias.weight_loader(bias, checkpoint.get_slice("experts_bias"))
        summed = bias.detach().clone()
        dist.all_reduce(summed)
        results["summand_counted_once"] = (summed - full["experts_bias"]).abs().max().item()

    uneven = torch.nn.Module()
    uneven.proj = ColumnParallelLinear(HIDDEN, 3 * HEAD_DIM, num_heads=3)
    try:
        check_partitions(uneven)
        results["uneven_heads_rejected"] = "not rejected"
    except Exception as error:  # noqa: BLE001 — the message is the result
        results["uneven_heads_rejected"] = str(error)
    path.unlink()
    results["held_whole"] = held_whole_names(full, tp.size)
    if launch.rank == 0:
        print(json.dumps(results))
    dist.barrier()
    dist.destroy_process_group()


def held_whole_names(full: dict, tp_size: int) -> list[str]:
    """What core.weights.held_whole reports for a column-parallel layer beside a norm weight: only the norm."""
    model = torch.nn.Module()
    model.proj = ColumnParallelLinear(HIDDEN, HEADS * HEAD_DIM, num_heads=HEADS)
    model.norm = torch.nn.Parameter(torch.ones(HIDDEN))
    with tempfile.TemporaryDirectory() as folder:
        save_file({"proj.weight": full["w"], "proj.bias": full["b"], "norm": full["o_b"]},
                  str(Path(folder) / "model.safetensors"))
        with SafetensorsCheckpoint(folder) as checkpoint:
            return sorted(held_whole(model, checkpoint))


if __name__ == "__main__":
    sys.exit(main())
