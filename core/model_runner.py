"""ModelRunner: the base class every generated `<Model>Runner` subclasses (method names follow the seed guide).

Life cycle: `__init__` → `init_device`; `init_model` → load (online split | offline split | random from config)
→ `_process_weight_after_loading` (`scale_dtype_adapter`, `to_device`, `cast_format`) → `graph_compile` →
`init_tokenizer`. Generation: `model_generate` (per model) tokenizes and builds the first input dict, then
`run_decode_loop` repeats `model_input_prepare` → `model_inference` → `model_output_process` until
`get_jump_flag`, timing prefill and every decode step inside `define_profiler`. In graph modes a compiled step
traces `model_input_prepare` into the same graph as the forward (`model_step`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from transformers import AutoConfig, AutoTokenizer, PreTrainedConfig
from transformers.initialization import no_init_weights

from core.backends import select_backend
from core.backends.aot_step import AotGreedyStep
from core.distributed import LaunchEnvironment, init_parallel_groups
from core.errors import CheckpointError, SettingsError
from core.kv_cache import StaticKVCache
from core.layers import check_partitions
from core.quantization import QuantizationMethod, QuantizedCheckpoint, declared_quantization, quantization_method
from core.quantization.low_bit import LowBitWeight, linear_layers, quantize_linears
from core.safetensors_reader import SafetensorsCheckpoint
from core.sampling import Sampler, SamplingParams, greedy_tokens, resolve_sampling, seen_tokens
from core.settings import is_placeholder_path, validate_runner_settings
from core.timing import GenerationTiming
from core.weights import held_whole, load_checkpoint_into

logger = logging.getLogger(__name__)


def compiled_graphs() -> int:
    """How many graphs torch.compile has compiled in this process (each recompilation adds one), and decode steps
    compiled ahead of time (core.backends.aot_step). Dynamo counts frames only where it may fall back to eager; a
    `fullgraph=True` compile (core.backends.base.one_graph) adds to the graph count alone."""
    return torch._dynamo.utils.counters["stats"]["unique_graphs"] + AotGreedyStep.loaded


# A prompt: a text, or a chat as a list of {"role": ..., "content": ...} messages.
Prompt = str | list[dict[str, str]]


@dataclass
class GenerationResult:
    prompts: list[Prompt]
    outputs: list[str]
    output_token_ids: list[list[int]]
    timing: dict[str, float]
    step_logits: list[torch.Tensor] = field(default_factory=list, repr=False)

    def to_json(self) -> dict[str, Any]:
        return {
            "prompts": self.prompts,
            "outputs": self.outputs,
            "output_token_ids": self.output_token_ids,
            "timing": self.timing,
        }


def read_hf_config(model_path: Path, config_class: type[PreTrainedConfig]) -> PreTrainedConfig:
    """The checkpoint's config.json as `config_class`; a checkpoint of another architecture is an error."""
    config_file = model_path / "config.json"
    if not config_file.is_file():
        raise CheckpointError(f"{config_file} does not exist; model_path must be a Hugging Face model folder")
    try:
        model_type = json.loads(config_file.read_text()).get("model_type")
    except json.JSONDecodeError as error:
        raise CheckpointError(f"{config_file} is not valid JSON: {error}") from None
    if model_type == config_class.model_type:
        return config_class.from_pretrained(model_path)
    text_config = _composite_text_config(model_path, model_type)
    if text_config is None or text_config.model_type != config_class.model_type:
        raise CheckpointError(
            f"{config_file} describes a '{model_type}' model but this port is for '{config_class.model_type}'"
        )
    logger.info("%s is a composite '%s' checkpoint: the port runs its '%s' text model", model_path, model_type,
                text_config.model_type)
    return config_class.from_dict(text_config.to_dict())


def _composite_text_config(model_path: Path, model_type: str | None) -> PreTrainedConfig | None:
    """The text config inside a multimodal checkpoint's composite config (Gemma 3's, Qwen3.5's, Llama 4's)."""
    try:
        composite = AutoConfig.from_pretrained(model_path)
    except (ValueError, KeyError):
        return None
    text_config = composite.get_text_config(decoder=True)
    return None if text_config is composite else text_config


class ModelRunner:
    """Subclasses set `model_class` (built as `model_class(config, runner_settings)`) and `config_class`."""

    model_class: type[torch.nn.Module]
    config_class: type[PreTrainedConfig]

    def __init__(self, runner_settings: dict[str, Any]):
        self.runner_settings = validate_runner_settings(runner_settings)
        settings = self.runner_settings
        self.model_name: str = settings["model_name"]
        self.model_path = Path(settings["model_path"])
        self.exe_mode: str = settings["exe_mode"]
        self.world_size: int = settings["world_size"]
        model_config = settings["model_config"]
        self.dtype: torch.dtype = getattr(torch, model_config["dtype"])
        self.with_ckpt: bool = model_config["with_ckpt"]
        self.enable_online_split_weight: bool = model_config["enable_online_split_weight"]
        self.enable_profiler: bool = model_config["enable_profiler"]
        self.enable_weight_nz: bool = model_config["enable_weight_nz"]
        self.tokenizer_mode: str = model_config["tokenizer_mode"]
        self.quant_weight_mode: str = model_config["quant_weight_mode"]
        self.weight_quant: str = model_config["weight_quant"]
        self.weight_quant_group_size: int = model_config["weight_quant_group_size"]
        self.quantization: QuantizationMethod | None = None
        self.sampling = SamplingParams()
        data_config = settings["data_config"]
        self.input_max_len: int = data_config["input_max_len"]
        self.max_new_tokens: int = data_config["max_new_tokens"]
        self.batch_size: int = data_config["batch_size"]
        self.max_position_embeddings: int | None = data_config["max_position_embeddings"]
        self.result_path = Path("results") / self.model_name
        self.model: torch.nn.Module | None = None
        self.prefill_forward = self.decode_forward = self.greedy_decode_forward = None
        self._model_attention: str | None = None  # the model's attention implementation (graph modes switch it)
        self.tokenizer = None
        self._kv_caches: dict[int, StaticKVCache] = {}
        self.init_device()

    # ------------------------------------------------------------------ device
    def init_device(self) -> None:
        settings = self.runner_settings
        self.backend = select_backend(settings["model_config"]["device"], self.exe_mode)
        launch = LaunchEnvironment.from_torchrun()
        if launch.world_size != self.world_size:
            raise SettingsError(
                f"world_size is {self.world_size} in runner_settings but {launch.world_size} processes were "
                f"launched; launch with torchrun --nproc-per-node {self.world_size} or set world_size: "
                f"{launch.world_size}"
            )
        self.global_rank, self.local_rank = launch.rank, launch.local_rank
        if self.weight_quant != "none" and self.backend.name != "cpu":
            raise SettingsError(
                f"model_config.weight_quant {self.weight_quant} runs on torch's CPU kernels, but the device is "
                f"{self.backend.name}; set device: cpu or weight_quant: none"
            )
        if self.enable_weight_nz and self.backend.name != "npu":
            raise SettingsError(
                f"model_config.enable_weight_nz needs an NPU, but the device is {self.backend.name}; set it to false"
            )
        self.backend.set_device(self.local_rank)
        self.device = self.backend.device(self.local_rank)
        init_parallel_groups(settings["parallel_config"], launch, self.backend.dist_backend)
        self.backend.manual_seed(self.runner_settings["model_config"]["seed"])

    # ------------------------------------------------------------------ model
    def init_model(self) -> None:
        """Build `model_class(config, runner_settings)` with weights, ready to generate."""
        config = self.load_hf_config(self.config_class)
        self.sampling = resolve_sampling(self.runner_settings["sampling_config"], self.model_path)
        self.quantization = self._verify_quantization(self._parse_quant_hf_config(config))
        self._check_sequence_budget(config)
        if not self.with_ckpt:
            self.model = self._build_model(config, initialize_weights=True)
        elif self.enable_online_split_weight:
            self._init_model_with_online_splited_weight(config)
        else:
            self._init_model_with_offline_splited_weight(config)
        self._process_weight_after_loading()
        self.graph_compile()
        self.backend.place_weights(self.model)
        self.init_tokenizer()

    def load_hf_config(self, config_class: type[PreTrainedConfig]) -> PreTrainedConfig:
        if is_placeholder_path(str(self.model_path)):
            raise SettingsError(
                f"model_path is still the placeholder '{self.model_path}'; set it in the YAML or pass --model-path"
            )
        return read_hf_config(self.model_path, config_class)

    def _check_sequence_budget(self, config: PreTrainedConfig) -> None:
        limit = self.max_position_embeddings or getattr(config, "max_position_embeddings", None)
        needed = self.input_max_len + self.max_new_tokens
        if limit is not None and needed > limit:
            raise SettingsError(
                f"data_config.input_max_len + max_new_tokens = {needed} exceeds max_position_embeddings {limit}; "
                f"lower one of them"
            )

    def _init_model_with_online_splited_weight(self, config: PreTrainedConfig) -> None:
        self.model = self._build_model(config, initialize_weights=False)
        with self._open_checkpoint(self.model_path) as checkpoint:
            load_checkpoint_into(self.model, checkpoint)
            if self.world_size > 1:
                self._report_held_whole(held_whole(self.model, checkpoint))

    def _report_held_whole(self, whole: dict[str, int]) -> None:
        """One line: the bytes every rank holds whole (replicated), by weight with the layer index dropped."""
        total = sum(param.numel() * param.element_size() for param in self.model.parameters())
        by_weight: dict[str, int] = {}
        for name, size in whole.items():
            key = re.sub(r"\.\d+\.", ".*.", name)
            by_weight[key] = by_weight.get(key, 0) + size
        largest = sorted(by_weight.items(), key=lambda item: -item[1])
        shown = ", ".join(f"{name} {_megabytes(size)}" for name, size in largest[:3])
        more = f" and {len(largest) - 3} more" if len(largest) > 3 else ""
        logger.info("rank %d holds %s of its %s whole, as every rank does: %s%s", self.global_rank,
                    _megabytes(sum(whole.values())), _megabytes(total), shown, more)

    def _init_model_with_offline_splited_weight(self, config: PreTrainedConfig) -> None:
        rank_path = self.model_path / f"rank_{self.global_rank}"
        if not rank_path.is_dir():
            raise CheckpointError(
                f"enable_online_split_weight is false, so the runner expects offline-split weights in {rank_path}, "
                f"which does not exist; set enable_online_split_weight: true to read {self.model_path} directly"
            )
        self.model = self._build_model(config, initialize_weights=False)
        with self._open_checkpoint(rank_path) as checkpoint:
            load_checkpoint_into(self.model, checkpoint, presplit=True)

    @contextlib.contextmanager
    def _open_checkpoint(self, folder: Path):
        """The folder's safetensors, seen through the checkpoint's quantization method when it declares one."""
        with SafetensorsCheckpoint(folder) as checkpoint:
            yield checkpoint if self.quantization is None else QuantizedCheckpoint(checkpoint, self.quantization)

    def _build_model(self, config: PreTrainedConfig, initialize_weights: bool) -> torch.nn.Module:
        """This rank's model (parallel layers allocate only their shards); sizes that TP cannot split are an
        error here, before any weight is read."""
        init_context = contextlib.nullcontext() if initialize_weights else no_init_weights()
        with init_context:
            model = self.model_class(config, self.runner_settings)
        model.tie_weights()
        check_partitions(model)
        model.to(self.dtype)
        for name, module in model.named_modules():
            if self._keeps_fp32(model, name):
                module.float()
        return model.eval()

    def _keeps_fp32(self, model: torch.nn.Module, module_name: str) -> bool:
        """HF's rule: `_keep_in_fp32_modules` under fp16, `_keep_in_fp32_modules_strict` under fp16 and bf16."""
        patterns: set[str] = set()
        if self.dtype == torch.float16:
            patterns |= set(getattr(model, "_keep_in_fp32_modules", None) or ())
        if self.dtype in (torch.float16, torch.bfloat16):
            patterns |= set(getattr(model, "_keep_in_fp32_modules_strict", None) or ())
        return bool(patterns) and any(part in patterns for part in module_name.split("."))

    def _process_weight_after_loading(self) -> None:
        self.quantize_weights()
        self.scale_dtype_adapter()
        self.to_device()
        self.cast_format()

    def quantize_weights(self) -> None:
        """`weight_quant`: this rank's float linear weights become int8 / int4 (torch's CPU kernels)."""
        left = quantize_linears(self.model, self.weight_quant, self.weight_quant_group_size)
        if left:
            first, why = next(iter(left.items()))
            logger.info("weight_quant %s: %d linear layers stay in %s (e.g. %s: %s)", self.weight_quant, len(left),
                        self.dtype, first, why)

    def scale_dtype_adapter(self) -> None:
        """Scales a quantization method keeps (packed weights) get the dtype its forward reads them in."""
        if self.quantization is not None:
            self.quantization.scale_dtype_adapter(self.model)

    def to_device(self) -> None:
        self.model.to(self.device)

    def cast_format(self) -> None:
        if self.enable_weight_nz:
            self.backend.cast_weight_format(self.model)

    def graph_compile(self) -> None:
        """Prefill and decode get their own compiled callables: decode has one fixed shape for every step;
        prefill is padded to a few bucket lengths (see `prefill_length`), one graph each — or runs eagerly where
        the backend says compiling it costs more than it saves (`compiles_prefill`)."""
        float_matmuls = not any(isinstance(layer.weight, LowBitWeight) for _, layer in linear_layers(self.model))
        autotune = self.runner_settings["model_config"]["compile_autotune"]
        self._model_attention = self.model.config._attn_implementation
        if self.exe_mode != "eager":
            self.backend.prepare_for_graphs(self.model, self.exe_mode, self.dtype, float_matmuls, autotune)
        self.decode_forward = self.backend.compile(self.prepared_logits, self.exe_mode, float_matmuls, autotune)
        ahead_of_time = self.runner_settings["model_config"]["aot_decode_step"]
        self.greedy_decode_forward = (self.backend.compile_greedy_step(self.prepared_greedy_step, self.model,
                                                                       self.exe_mode, float_matmuls, autotune,
                                                                       ahead_of_time)
                                      if self.backend.greedy_step_in_graph else None)
        self.prefill_forward = (self.backend.compile(self.prepared_logits, self.exe_mode, float_matmuls, autotune)
                                if self.backend.compiles_prefill else self.prepared_logits)

    def next_token_logits(self, **model_inputs) -> torch.Tensor:
        """Each row's last-position logits, [batch, vocab] float32 (rounded to the model's dtype first, as its
        head returns them). Cast inside the graph, the head's kernel writes float32 once: cast after it, a
        second pass copies the logits (~0.4 ms a step for SmolLM2 batch 8 on 2 CPU cores)."""
        return self.model.forward(**model_inputs).logits[:, -1, :].float()

    def prepared_logits(self, input_dict: dict[str, Any]) -> tuple[dict[str, Any], torch.Tensor]:
        """`model_input_prepare`, then the forward: (model inputs, next-token logits). Compiled as one graph, the
        prepare's small ops (the masks over the cache, the write slots) run inside the forward's kernels instead of
        one by one in eager mode, where each pays its dispatch with code the step's weights have flushed from the
        caches: ~0.2 ms of a 9.5 ms SmolLM2 bfloat16 step on 2 EPYC cores."""
        model_inputs = self.model_input_prepare(input_dict)
        return model_inputs, self.next_token_logits(**model_inputs)

    def prepared_greedy_step(self, input_dict: dict[str, Any], finished: torch.Tensor,
                             pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
        """A whole greedy decode step: `prepared_logits`, each row's argmax (padding once the row has finished), then
        `model_output_process`: (logits, next tokens). Compiled, sampling and the next step's inputs join the
        step's graph as well: ~0.15 ms a step less eager work on 2 EPYC cores."""
        model_inputs, logits = self.prepared_logits(input_dict)
        next_tokens = torch.where(finished, pad_token_id, greedy_tokens(logits))
        self.model_output_process(model_inputs, next_tokens, input_dict)
        return logits, next_tokens

    def _parse_quant_hf_config(self, config: PreTrainedConfig) -> dict[str, Any] | None:
        """The checkpoint's `quantization_config` (quant_method and the method's settings), or None."""
        return declared_quantization(config)

    def _verify_quantization(self, quant_config: dict[str, Any] | None) -> QuantizationMethod | None:
        """The registered method for the checkpoint's quantization, set up for `quant_weight_mode`; an
        unsupported method fails here, before any weight is read, naming the supported ones."""
        if quant_config is None or not self.with_ckpt:
            return None
        return quantization_method(quant_config, self.quant_weight_mode, self.model_path / "config.json")

    # ------------------------------------------------------------------ tokenizer
    def init_tokenizer(self) -> None:
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_path, padding_side="left")
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token

    def tokenize_prompts(self, prompts: list[Prompt]) -> dict[str, torch.Tensor]:
        """Left-padded token ids and attention mask; prompts longer than input_max_len are truncated.

        A prompt is a text or a chat (a list of {"role", "content"} messages); a chat, and a text under
        tokenizer_mode chat (as the user's message), go through the tokenizer's chat template."""
        chats = [prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
                 for prompt in prompts if isinstance(prompt, list) or self.tokenizer_mode == "chat"]
        chat_ids = iter(self.tokenizer(
            [self.tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=False) for chat in chats],
            add_special_tokens=False,
        )["input_ids"] if chats else [])
        texts = [prompt for prompt in prompts if not (isinstance(prompt, list) or self.tokenizer_mode == "chat")]
        text_ids = iter(self.tokenizer(texts)["input_ids"] if texts else [])
        token_ids = [next(chat_ids) if isinstance(prompt, list) or self.tokenizer_mode == "chat" else next(text_ids)
                     for prompt in prompts]
        for index, ids in enumerate(token_ids):
            if len(ids) > self.input_max_len:
                logger.warning(
                    "prompt %d has %d tokens; truncated to data_config.input_max_len %d",
                    index, len(ids), self.input_max_len,
                )
                keep_end = self.tokenizer.truncation_side == "left"
                token_ids[index] = ids[-self.input_max_len :] if keep_end else ids[: self.input_max_len]
        batch = self.tokenizer.pad({"input_ids": token_ids}, padding="longest", return_tensors="pt")
        return {"input_ids": batch["input_ids"].to(self.device), "attention_mask": batch["attention_mask"].to(self.device)}

    # ------------------------------------------------------------------ generation
    def prefill_length(self, prompt_length: int) -> int:
        """Graph modes that compile prefill pad prompts (on the left, masked, so exactly) to a power-of-two bucket
        of at least 16, capped at input_max_len: at most log2(input_max_len) prefill graphs are ever compiled, and
        NPU graph modes need static shapes anyway. An eager prefill runs the prompt at its own length."""
        if self.exe_mode == "eager" or not self.backend.compiles_prefill:
            return prompt_length
        bucket = 16
        while bucket < prompt_length:
            bucket *= 2
        return min(bucket, self.input_max_len)

    def kv_cache_for(self, batch_size: int) -> StaticKVCache:
        """One static cache per batch size, input_max_len + max_new_tokens slots, kept across calls: its fixed
        buffers are what lets a compiled decode graph be reused."""
        if batch_size not in self._kv_caches:
            self._kv_caches[batch_size] = StaticKVCache.for_model(
                self.model.config, self.input_max_len + self.max_new_tokens, self.device
            )
        return self._kv_caches[batch_size]

    def prompt_input_dict(self, prompts: list[Prompt]) -> dict[str, Any]:
        """The first step's inputs: left-padded prompt tokens, the cache-slot attention mask, each row's
        positions (counting only its real tokens), the slots to write, and the static KV cache."""
        batch = self.tokenize_prompts(prompts)
        input_ids, prompt_mask = batch["input_ids"], batch["attention_mask"]
        length = self.prefill_length(input_ids.shape[1])
        extra = length - input_ids.shape[1]
        if extra:
            input_ids = torch.nn.functional.pad(input_ids, (extra, 0), value=self.tokenizer.pad_token_id)
            prompt_mask = torch.nn.functional.pad(prompt_mask, (extra, 0), value=0)
        cache = self.kv_cache_for(input_ids.shape[0])
        cache.begin_prompt()
        attention_mask = torch.zeros(input_ids.shape[0], cache.max_len, dtype=torch.long, device=self.device)
        attention_mask[:, :length] = prompt_mask
        position_ids = (prompt_mask.cumsum(-1) - 1).masked_fill(prompt_mask == 0, 1)
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "position_ids": position_ids,
            "cache_position": torch.arange(length, device=self.device),
            "kv_cache": cache,
        }

    def model_generate(self, prompts: list[Prompt], **options) -> GenerationResult:
        raise NotImplementedError(f"{type(self).__name__} must implement model_generate")

    def model_input_prepare(self, input_dict: dict[str, Any]) -> dict[str, Any]:
        raise NotImplementedError(f"{type(self).__name__} must implement model_input_prepare")

    def model_output_process(self, model_inputs: dict[str, Any], next_tokens: torch.Tensor,
                             input_dict: dict[str, Any]) -> None:
        raise NotImplementedError(f"{type(self).__name__} must implement model_output_process")

    def mark_inputs(self, input_dict: dict[str, Any]) -> None:
        """Mark decode inputs static so a compiled graph is reused across steps (no-op in eager)."""
        if self.exe_mode == "eager":
            return
        for value in input_dict.values():
            if isinstance(value, torch.Tensor):
                torch._dynamo.mark_static(value)

    def model_inference(self, model_inputs: dict[str, Any]) -> torch.Tensor:
        """Run one forward step eagerly on prepared inputs; return the logits of each row's last position,
        [batch, vocab] float32. Graph modes run their steps through `model_step`."""
        self._select_attention(model_inputs["input_ids"].shape[1] == 1)
        with torch.inference_mode():
            return self.next_token_logits(**model_inputs)

    def model_step(self, input_dict: dict[str, Any]) -> tuple[dict[str, Any], torch.Tensor]:
        """`model_input_prepare` then `model_inference` for one step: (model inputs, logits [batch, vocab] float32).
        A graph mode's compiled steps (every decode step; prefill where the backend compiles it) run both in one
        graph (`prepared_logits`)."""
        decoding = input_dict["input_ids"].shape[1] == 1
        if self.exe_mode == "eager" or not (decoding or self.backend.compiles_prefill):
            model_inputs = self.model_input_prepare(input_dict)
            return model_inputs, self.model_inference(model_inputs)
        return self._run_graph(self.decode_forward if decoding else self.prefill_forward, decoding, input_dict)

    def greedy_decode_step(self, input_dict: dict[str, Any], finished: torch.Tensor,
                           pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
        """One greedy decode step in a graph mode, choosing the tokens and updating `input_dict` inside the compiled
        graph (`prepared_greedy_step`): (logits, next tokens)."""
        return self._run_graph(self.greedy_decode_forward, True, input_dict, finished, pad_token_id)

    def _run_graph(self, forward: Callable, decoding: bool, input_dict: dict[str, Any], *args) -> Any:
        if decoding:
            self.mark_inputs(input_dict)
        self._select_attention(decoding)
        with torch.inference_mode():
            cache = next((value for value in input_dict.values() if isinstance(value, StaticKVCache)), None)
            if cache is not None and not cache.allocated:
                # The cache's buffers take their shapes from their first write, which no graph may trace.
                self.model(**self.model_input_prepare(input_dict))
                cache.begin_prompt()  # that pass advanced the recurrent states: the graph's prefill starts afresh
            return forward(input_dict, *args)

    def _select_attention(self, decoding: bool) -> None:
        """Compiled decode steps may run another attention implementation than the model's (the backend's
        `decode_attention`); each graph keeps the one it was traced with."""
        if self.exe_mode == "eager":
            return
        wanted = self.backend.decode_attention(self._model_attention) if decoding else self._model_attention
        if self.model.config._attn_implementation != wanted:
            self.model.config._attn_implementation = wanted

    def get_jump_flag(self, step: int, max_new_tokens: int, finished: torch.Tensor | None) -> bool:
        """Stop after max_new_tokens steps or once every row has finished; `finished` None: rows never stop early."""
        return step >= max_new_tokens or (finished is not None and bool(finished.all()))

    def define_profiler(self) -> contextlib.AbstractContextManager:
        """A trace of the measured run (prefill and decode steps labelled) under result_path/profiler/."""
        if not self.enable_profiler:
            return contextlib.nullcontext()
        return self.backend.profiler(self.result_path / "profiler")

    def run_decode_loop(
        self,
        prompts: list[Prompt],
        build_input_dict: Callable[[list[Prompt]], dict[str, Any]],
        max_new_tokens: int | None = None,
        teacher_tokens: torch.Tensor | None = None,
        ignore_eos: bool = False,
        keep_logits: bool = False,
        warm_up: bool = False,
        sampling: SamplingParams | dict[str, Any] | None = None,
        stream: Callable[[list[list[int]], list[bool]], None] | None = None,
    ) -> GenerationResult:
        """Generate for `prompts`, starting from `build_input_dict(prompts)`.

        sampling: the runner's `sampling_config` (resolved at init_model), or SamplingParams, or a dict of
        changes to it ({"temperature": 0.7, "seed": 1}); greedy unless do_sample with temperature > 0.
        warm_up: generate once first (compiling every graph the run needs), then measure a second run, which
        must compile nothing: `timing["recompiles_after_warmup"]` counts what it did compile.
        teacher_tokens ([batch, steps]) feeds given tokens instead of choosing them (teacher forcing, for
        verification); keep_logits keeps each step's last-position logits on the CPU in float32.
        stream(rows, finished) is called after every step of the measured run with each row's tokens so far.
        """
        max_new_tokens = max_new_tokens or self.max_new_tokens
        if max_new_tokens > self.max_new_tokens:
            raise SettingsError(
                f"{max_new_tokens} new tokens asked for, but the KV cache is sized for data_config.max_new_tokens "
                f"{self.max_new_tokens}"
            )
        params = sampling if isinstance(sampling, SamplingParams) else self.sampling.replace(**(sampling or {}))
        compile_seconds = 0.0
        if warm_up:
            started = time.perf_counter()
            self._decode(build_input_dict(prompts), max_new_tokens, teacher_tokens, ignore_eos, params)
            compile_seconds = time.perf_counter() - started
        graphs_before = compiled_graphs()
        token_rows, lengths, step_logits, timing = self._decode(
            build_input_dict(prompts), max_new_tokens, teacher_tokens, ignore_eos, params, keep_logits,
            self.enable_profiler, stream,
        )
        summary = {**timing.summary(), "compile_s": round(compile_seconds, 3),
                   "recompiles_after_warmup": compiled_graphs() - graphs_before}
        output_token_ids = [row[:length] for row, length in zip(token_rows, lengths)]
        outputs = self.tokenizer.batch_decode(output_token_ids, skip_special_tokens=True)
        logger.info("%s | compile (warm-up) %.2f s | recompiles after warm-up: %d", timing.report(),
                    compile_seconds, summary["recompiles_after_warmup"])
        return GenerationResult(prompts, outputs, output_token_ids, summary, step_logits)

    def _decode(self, input_dict: dict[str, Any], max_new_tokens: int, teacher_tokens: torch.Tensor | None,
                ignore_eos: bool, sampling: SamplingParams, keep_logits: bool = False, profile: bool = False,
                stream: Callable[[list[list[int]], list[bool]], None] | None = None):
        """Returns each row's tokens, how many of them are its output (up to and including what stopped it),
        the kept logits and the timing."""
        batch_size = input_dict["input_ids"].shape[0]
        sampler = Sampler(sampling, self.device, self.runner_settings["model_config"]["seed"])
        stop_ids = torch.tensor(self.eos_token_ids() + list(sampling.eos_token_id), device=self.device)
        prompt_ids = input_dict["input_ids"]
        prompt_mask = input_dict["attention_mask"][:, : prompt_ids.shape[1]]
        seen = None
        pad_id = self.tokenizer.pad_token_id
        finished = torch.zeros(batch_size, dtype=torch.bool, device=self.device)
        any_finished = False  # finished rows' tokens become padding; until one finishes that costs a pass a step
        greedy_in_graph = (self.exe_mode != "eager" and self.greedy_decode_forward is not None
                           and teacher_tokens is None and sampling.greedy and sampling.repetition_penalty == 1.0)
        lengths = [max_new_tokens] * batch_size
        generated: list[torch.Tensor] = []
        step_logits: list[torch.Tensor] = []
        timers = []
        step = 0
        # Inference mode throughout: a tensor made outside it carries another dispatch key set than one a compiled
        # step makes, and the graph's guards would tell the first step's inputs from the later ones' (a second
        # compile of the same step).
        with self.define_profiler() if profile else contextlib.nullcontext(), torch.inference_mode():
            # Rows finish only at EOS or a stop string: ignoring both, no step waits for the device to ask.
            while not self.get_jump_flag(step, max_new_tokens, None if ignore_eos else finished):
                with self.backend.step_timer() as timer, step_label(step) if profile else contextlib.nullcontext():
                    if greedy_in_graph and input_dict["input_ids"].shape[1] == 1:
                        logits, next_tokens = self.greedy_decode_step(input_dict, finished, pad_id)
                    else:
                        model_inputs, logits = self.model_step(input_dict)
                        if sampling.repetition_penalty != 1.0 and seen is None:
                            seen = seen_tokens(prompt_ids, prompt_mask, logits.shape[-1])
                        next_tokens = (sampler(logits, seen) if teacher_tokens is None
                                       else teacher_tokens[:, step].clone())
                        if any_finished:
                            next_tokens = torch.where(finished, pad_id, next_tokens)
                        self.model_output_process(model_inputs, next_tokens, input_dict)
                timers.append(timer)
                if keep_logits:
                    step_logits.append(logits.float().cpu())
                generated.append(next_tokens)
                if seen is not None:
                    seen.scatter_(1, next_tokens[:, None], True)
                if not ignore_eos:
                    stopped = torch.isin(next_tokens, stop_ids) & ~finished
                    if sampling.stop_strings:
                        stopped |= self._ends_in_stop_string(generated, sampling.stop_strings) & ~finished
                    for row in stopped.nonzero().flatten().tolist():
                        lengths[row] = step + 1
                        any_finished = True
                    finished |= stopped
                step += 1
                if stream is not None:
                    stream(torch.stack(generated, dim=1).tolist(), finished.tolist())
        lengths = [min(length, step) for length in lengths]
        tokens = torch.stack(generated, dim=1).tolist()
        self.backend.synchronize()
        timing = GenerationTiming(batch_size, timers[0].elapsed_ms, [timer.elapsed_ms for timer in timers[1:]])
        return tokens, lengths, step_logits, timing

    def _ends_in_stop_string(self, generated: list[torch.Tensor], stop_strings: tuple[str, ...]) -> torch.Tensor:
        """Rows whose newest tokens' text holds a stop string (transformers' stop_strings: the text is kept)."""
        window = max(len(text) for text in stop_strings) + 1
        tails = self.tokenizer.batch_decode(torch.stack(generated[-window:], dim=1).tolist(), skip_special_tokens=True)
        return torch.tensor([any(text in tail for text in stop_strings) for tail in tails], device=self.device)

    def eos_token_ids(self) -> list[int]:
        eos = self.model.config.eos_token_id
        if eos is None:
            eos = self.tokenizer.eos_token_id
        ids = eos if isinstance(eos, list) else [eos]
        return [token for token in ids if token is not None]


def step_label(step: int) -> torch.profiler.record_function:
    """The profiler trace's name for a generation step (opened only under the profiler: ~6 us a step otherwise)."""
    return torch.profiler.record_function("prefill" if step == 0 else "decode")


def _megabytes(size: int) -> str:
    return f"{size / 1e6:.3g} MB"
