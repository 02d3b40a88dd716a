"""Choosing each next token: greedy, or sampled as transformers' `generate(do_sample=True)` samples.

It runs on the logits the compiled forward returns, outside the graph, so one decode graph serves every
setting. The processing order and math are transformers': repetition penalty, then (sampling only)
temperature, top-k, top-p, min-p; then `torch.multinomial` on the softmax, drawn from a generator seeded per
generation, so a seeded run is repeatable and, on equal logits, draws what transformers draws after
`torch.manual_seed(seed)`.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import GenerationConfig

from core.errors import SettingsError
from core.kernels import cpu_kernels

logger = logging.getLogger(__name__)

# generation_config.json keys that change decoding in transformers but not here: named in a warning when set.
NOT_APPLIED = ("num_beams", "typical_p", "epsilon_cutoff", "eta_cutoff", "top_h", "no_repeat_ngram_size",
               "bad_words_ids", "suppress_tokens", "begin_suppress_tokens", "forced_bos_token_id",
               "forced_eos_token_id", "sequence_bias", "encoder_repetition_penalty", "min_length", "min_new_tokens",
               "exponential_decay_length_penalty", "renormalize_logits", "guidance_scale", "penalty_alpha")


@dataclass(frozen=True)
class SamplingParams:
    """What `sampling_config` holds once resolved; the defaults are transformers' GenerationConfig defaults."""

    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 50
    top_p: float = 1.0
    min_p: float | None = None
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop_strings: tuple[str, ...] = ()
    eos_token_id: tuple[int, ...] = ()  # stop ids on top of the model's own end-of-sequence ids

    @property
    def greedy(self) -> bool:
        return not self.do_sample or self.temperature == 0

    def replace(self, **changes: Any) -> "SamplingParams":
        """A copy with `changes` applied (None values ignored) and checked."""
        known = {field.name for field in dataclasses.fields(self)}
        unknown = sorted(set(changes) - known)
        if unknown:
            raise SettingsError(f"unknown sampling option '{unknown[0]}' (known: {', '.join(sorted(known))})")
        given = {key: value for key, value in changes.items() if value is not None}
        for key in ("stop_strings", "eos_token_id"):
            if key in given:
                value = given[key]
                given[key] = tuple([value] if isinstance(value, (str, int)) else value)
        return dataclasses.replace(self, **given).checked()

    def checked(self, source: str = "sampling_config") -> "SamplingParams":
        problems = [
            (self.temperature < 0, f"temperature must be at least 0 (0 is greedy), got {self.temperature}"),
            (self.top_k < 0, f"top_k must be at least 0 (0 keeps every token), got {self.top_k}"),
            (not 0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}"),
            (self.min_p is not None and not 0 <= self.min_p <= 1, f"min_p must be in [0, 1], got {self.min_p}"),
            (self.repetition_penalty <= 0,
             f"repetition_penalty must be above 0 (1 is none), got {self.repetition_penalty}"),
            (any(not text for text in self.stop_strings), "stop_strings must not hold an empty string"),
        ]
        for failed, message in problems:
            if failed:
                raise SettingsError(f"{source}.{message}")
        return self


def resolve_sampling(settings: dict[str, Any], model_path: Path) -> SamplingParams:
    """`sampling_config` over the checkpoint's generation_config.json over transformers' defaults."""
    try:
        generation_config = GenerationConfig.from_pretrained(model_path)
    except OSError:
        generation_config = GenerationConfig()
    defaults = GenerationConfig()
    ignored = sorted(key for key in NOT_APPLIED
                     if getattr(generation_config, key, None) != getattr(defaults, key, None))
    if ignored:
        logger.warning("generation_config.json sets %s, which this runner does not apply", ", ".join(ignored))
    from_checkpoint = {
        "do_sample": generation_config.do_sample,
        "temperature": generation_config.temperature,
        "top_k": generation_config.top_k,
        "top_p": generation_config.top_p,
        "min_p": generation_config.min_p,
        "repetition_penalty": generation_config.repetition_penalty,
        "stop_strings": generation_config.stop_strings,
    }
    params = SamplingParams().replace(**from_checkpoint)
    given = {key: value for key, value in settings.items() if value not in (None, [])}
    return params.replace(**given)


def seen_tokens(prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """The repetition penalty's input: [batch, vocab] true where a row's prompt (its real tokens, not the
    padding) holds the token; the decode loop marks each generated token as it goes."""
    counts = torch.zeros(prompt_ids.shape[0], vocab_size, dtype=torch.long, device=prompt_ids.device)
    return counts.scatter_add_(1, prompt_ids, prompt_mask.long()) > 0


ARGMAX_CHUNK = 1024


@torch.compiler.assume_constant_result
def cpu_argmax_kernel_loaded() -> bool:
    """Whether the AVX-512 argmax is loaded; a compiled graph takes the answer as a constant instead of tracing the
    loader."""
    return cpu_kernels() is None


def greedy_tokens(logits: torch.Tensor) -> torch.Tensor:
    """Each row's first index of its largest logit, as torch.argmax returns it. CUDA reduces one long row in one
    block of threads (~27 us for a 128K vocabulary on an H200, 2% of a 1B model's decode step): there the row is
    reduced in chunks side by side, then the chunks' maxima. On CPU our AVX-512 kernel where it is built
    (core/kernels/row_argmax_avx512.cpp): torch's walks a row one element at a time."""
    if logits.device.type == "cuda" and logits.shape[-1] > 4 * ARGMAX_CHUNK:
        return chunked_argmax(logits)
    # The same index either way (bf16 → fp32 is exact); torch's CPU argmax over bf16 is 3x slower.
    rows = logits.float().reshape(-1, logits.shape[-1])
    if logits.device.type == "cpu" and rows.shape[-1] > 0 and cpu_argmax_kernel_loaded():
        return torch.ops.recipes_scaffold.row_argmax(rows.contiguous()).reshape(logits.shape[:-1])
    return rows.argmax(dim=-1).reshape(logits.shape[:-1])


def chunked_argmax(logits: torch.Tensor) -> torch.Tensor:
    """torch.argmax over the last dimension in two reductions. Ties go to the first index: max() keeps the first
    within a chunk, argmax the first chunk."""
    vocab = logits.shape[-1]
    chunks = -(-vocab // ARGMAX_CHUNK)
    padded = torch.nn.functional.pad(logits, (0, chunks * ARGMAX_CHUNK - vocab), value=float("-inf"))
    maxima, within = padded.view(*logits.shape[:-1], chunks, ARGMAX_CHUNK).max(dim=-1)
    best_chunk = maxima.argmax(dim=-1, keepdim=True)
    return (best_chunk * ARGMAX_CHUNK + within.gather(-1, best_chunk)).squeeze(-1)


class Sampler:
    """Next tokens for one generation: `sampler(logits, seen)`; `seen` [batch, vocab] marks each row's prompt
    and generated tokens (for the repetition penalty)."""

    def __init__(self, params: SamplingParams, device: torch.device, default_seed: int):
        self.params = params
        self.generator = None
        if not params.greedy:
            self.generator = torch.Generator(device).manual_seed(
                params.seed if params.seed is not None else default_seed
            )

    def processed_scores(self, logits: torch.Tensor, seen: torch.Tensor | None) -> torch.Tensor:
        """transformers' logits processors and warpers for these settings, in its order, on float32 scores."""
        params = self.params
        scores = logits.float()
        if params.repetition_penalty != 1.0 and seen is not None:
            penalised = torch.where(scores < 0, scores * params.repetition_penalty, scores / params.repetition_penalty)
            scores = torch.where(seen, penalised, scores)
        if params.greedy:
            return scores
        if params.temperature != 1.0:
            scores = scores / params.temperature
        if params.top_k:
            kth = torch.topk(scores, min(params.top_k, scores.shape[-1])).values[..., -1:]
            scores = scores.masked_fill(scores < kth, -float("inf"))
        if params.top_p < 1.0:
            sorted_scores, order = torch.sort(scores, descending=False)
            cumulative = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
            remove_sorted = cumulative <= (1 - params.top_p)
            remove_sorted[..., -1:] = False
            scores = scores.masked_fill(remove_sorted.scatter(1, order, remove_sorted), -float("inf"))
        if params.min_p is not None:
            probs = scores.softmax(dim=-1)
            remove = probs < params.min_p * probs.amax(dim=-1, keepdim=True)
            remove.scatter_(-1, probs.argmax(dim=-1, keepdim=True), False)
            scores = scores.masked_fill(remove, -float("inf"))
        return scores

    def __call__(self, logits: torch.Tensor, seen: torch.Tensor | None = None) -> torch.Tensor:
        params = self.params
        if params.greedy and params.repetition_penalty == 1.0:
            return greedy_tokens(logits)
        scores = self.processed_scores(logits, seen)
        if params.greedy:
            return greedy_tokens(scores)
        probs = scores.softmax(dim=-1)
        return torch.multinomial(probs, num_samples=1, generator=self.generator).squeeze(1)
