"""The regression check itself must fail on broken ports: a mis-masked, mis-positioned or mis-sharded variant."""

import torch

from generated_models.gpt_oss.runner_gpt_oss import GptOssRunner
from scaffold.verify import verify_port


class IgnoresPaddingRunner(GptOssRunner):
    """Marks the prompt's padding slots as real tokens: left padding leaks into attention."""

    def model_input_prepare(self, input_dict):
        prompt_length = input_dict["input_ids"].shape[1]
        if prompt_length > 1:
            input_dict["attention_mask"][:, :prompt_length] = 1
        return super().model_input_prepare(input_dict)


class OffByOnePositionsRunner(GptOssRunner):
    """Gives each decoded token the position of the token before it. (A constant shift of a whole row would
    go unnoticed, rightly: RoPE sees only relative positions.)"""

    def model_input_prepare(self, input_dict):
        model_inputs = super().model_input_prepare(input_dict)
        if model_inputs["input_ids"].shape[1] == 1:
            model_inputs["position_ids"] = model_inputs["position_ids"] - 1
        return model_inputs


class MisShardedRunner(GptOssRunner):
    """Loads layer 0's q rows (the first segment of the merged q|k|v) with their two halves swapped, as a wrong
    column split would."""

    def _process_weight_after_loading(self):
        qkv_proj = self.model.model.layers[0].self_attn.qkv_proj
        query = qkv_proj.weight.data[: qkv_proj.split_sizes[0]]
        query.copy_(torch.cat(query.chunk(2, dim=0)[::-1]))
        super()._process_weight_after_loading()


def test_correct_port_passes(tiny_gpt_oss):
    report = verify_port(GptOssRunner, tiny_gpt_oss)
    assert report.passed, report.summary()
    assert report.max_abs_logit_diff <= 1e-4


def test_mis_masked_port_is_caught(tiny_gpt_oss):
    report = verify_port(IgnoresPaddingRunner, tiny_gpt_oss)
    assert not report.passed and report.max_abs_logit_diff > 1e-2, report.summary()


def test_mis_positioned_port_is_caught(tiny_gpt_oss):
    report = verify_port(OffByOnePositionsRunner, tiny_gpt_oss)
    assert not report.passed, report.summary()


def test_mis_sharded_port_is_caught(tiny_gpt_oss):
    report = verify_port(MisShardedRunner, tiny_gpt_oss)
    assert not report.passed and report.mismatches, report.summary()
