"""Sampling: seeded runs of a port draw what transformers' `generate(do_sample=True)` draws after
`torch.manual_seed(seed)`, the sampler's draws follow the processed distribution, and bad values are refused."""

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.generation.logits_process import (
    LogitsProcessorList,
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from core.errors import SettingsError
from core.sampling import Sampler, SamplingParams
from generated_models.gpt_oss.runner_gpt_oss import GptOssRunner
from generated_models.llama.runner_llama import LlamaRunner
from scaffold.verify import verification_settings, build_tiny_checkpoint

PROMPT = "The quick brown fox"
STEPS = 24
SETTINGS = {
    "temperature only": {"temperature": 0.8},
    "top-k + top-p": {"temperature": 1.3, "top_k": 20, "top_p": 0.9},
    "min-p + repetition penalty": {"min_p": 0.05, "repetition_penalty": 1.3, "top_k": 0},
}


@pytest.fixture(scope="module", params=[("llama", LlamaRunner), ("gpt_oss", GptOssRunner)], ids=["llama", "gpt_oss"])
def model(request, tmp_path_factory):
    model_type, runner_class = request.param
    checkpoint = build_tiny_checkpoint(model_type, tmp_path_factory.mktemp(f"{model_type}_sampling"))
    runner = runner_class(verification_settings(runner_class, checkpoint, 1, STEPS, {}))
    runner.init_model()
    hf = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    hf.generation_config.eos_token_id = None
    return model_type, runner, hf, AutoTokenizer.from_pretrained(checkpoint)


def exponential_race(seed: int, steps: int, vocab: int) -> list[torch.Tensor]:
    """The Exp(1) draws `torch.multinomial(probs, 1)` makes at each step from a generator seeded with `seed`:
    it picks argmax(probs / q). With them a differing step can be explained exactly."""
    generator = torch.Generator().manual_seed(seed)
    return [torch.empty(1, vocab).exponential_(1, generator=generator) for _ in range(steps)]


@pytest.mark.parametrize("setting", SETTINGS)
def test_seeded_sampling_draws_what_transformers_draws(model, setting, measurements):
    model_type, runner, hf, tokenizer = model
    seed = 1234
    options = {"do_sample": True, **SETTINGS[setting]}
    batch = tokenizer([PROMPT], return_tensors="pt")
    torch.manual_seed(seed)
    with torch.inference_mode():
        hf_out = hf.generate(**batch, max_new_tokens=STEPS, min_new_tokens=0, output_scores=True,
                             return_dict_in_generate=True, pad_token_id=tokenizer.pad_token_id, **options)
    hf_tokens = hf_out.sequences[0, batch["input_ids"].shape[1]:].tolist()
    port = runner.model_generate([PROMPT], sampling={**options, "seed": seed}, ignore_eos=True, keep_logits=True)
    port_tokens = port.output_token_ids[0]
    differing = [step for step, (a, b) in enumerate(zip(hf_tokens, port_tokens)) if a != b]
    note = f"{model_type} {setting}: {STEPS} sampled tokens, "
    if not differing:
        measurements.append(note + "identical to HF")
        return
    # After the first difference the two continue from different text: only that step can be compared.
    step = differing[0]
    race = exponential_race(seed, step + 1, hf_out.scores[step].shape[-1])[step]
    hf_probs = hf_out.scores[step].float().softmax(-1)
    sampler = Sampler(runner.sampling.replace(**options), torch.device("cpu"), seed)
    seen = torch.zeros_like(hf_probs, dtype=torch.bool)
    seen[0, batch["input_ids"][0].tolist() + port_tokens[:step]] = True
    port_probs = sampler.processed_scores(port.step_logits[step], seen).softmax(-1)
    hf_pick, port_pick = (hf_probs / race).argmax(-1).item(), (port_probs / race).argmax(-1).item()
    margin = ((hf_probs / race)[0, hf_pick] - (hf_probs / race)[0, port_pick]) / (hf_probs / race)[0, hf_pick]
    explained = (hf_pick, port_pick) == (hf_tokens[step], port_tokens[step]) and margin < 1e-4
    measurements.append(note + f"first differs at step {step}: HF {hf_pick} vs port {port_pick}, the same draw "
                               f"falls {margin:.1e} (relative) from the boundary between them")
    assert explained, f"step {step}: HF {hf_tokens[step]}, port {port_tokens[step]}, not a near-boundary draw"


def test_greedy_is_the_argmax_path(model):
    _, runner, _, _ = model
    greedy = runner.model_generate([PROMPT], ignore_eos=True)
    zero_temperature = runner.model_generate([PROMPT], sampling={"do_sample": True, "temperature": 0},
                                             ignore_eos=True)
    assert greedy.output_token_ids == zero_temperature.output_token_ids


def test_processing_matches_transformers_processors():
    torch.manual_seed(0)
    logits = torch.randn(3, 50) * 3
    seen = torch.zeros(3, 50, dtype=torch.bool)
    seen[:, [1, 7, 9]] = True
    params = SamplingParams(do_sample=True, temperature=0.7, top_k=12, top_p=0.85, min_p=0.05,
                            repetition_penalty=1.2)
    hf = LogitsProcessorList([
        RepetitionPenaltyLogitsProcessor(1.2), TemperatureLogitsWarper(0.7), TopKLogitsWarper(12),
        TopPLogitsWarper(0.85), MinPLogitsWarper(0.05),
    ])
    expected = hf(torch.tensor([[1, 7, 9]] * 3), logits.clone())
    assert torch.equal(Sampler(params, torch.device("cpu"), 0).processed_scores(logits, seen), expected)


def test_draws_follow_the_processed_distribution(measurements):
    """20,000 draws of one step: each token's frequency within 5 standard errors of its processed probability,
    and tokens that top-k / top-p / min-p removed never drawn."""
    torch.manual_seed(1)
    logits = torch.randn(1, 16) * 2
    params = SamplingParams(do_sample=True, temperature=0.9, top_k=10, top_p=0.95, min_p=0.02, seed=7)
    sampler = Sampler(params, torch.device("cpu"), 0)
    probs = sampler.processed_scores(logits, None).softmax(-1)[0]
    draws = 20_000
    counts = torch.bincount(sampler(logits.expand(draws, -1)), minlength=16).double()
    frequency = counts / draws
    standard_error = (probs * (1 - probs) / draws).sqrt()
    worst = ((frequency - probs).abs() / standard_error.clamp(min=1e-12))[probs > 0].max().item()
    measurements.append(f"sampler: {draws} draws, worst token {worst:.2f} standard errors from its probability")
    assert worst < 5 and counts[probs == 0].sum() == 0 and (probs == 0).any()


@pytest.mark.parametrize("change, message", [
    ({"temperature": -0.5}, "temperature must be at least 0"),
    ({"top_p": 1.5}, "top_p must be in (0, 1], got 1.5"),
    ({"top_p": 0}, "top_p must be in (0, 1], got 0"),
    ({"top_k": -1}, "top_k must be at least 0"),
    ({"min_p": 2.0}, "min_p must be in [0, 1]"),
    ({"repetition_penalty": 0}, "repetition_penalty must be above 0"),
])
def test_bad_values_name_the_key(change, message):
    with pytest.raises(SettingsError) as error:
        SamplingParams().replace(**change)
    assert message in str(error.value) and "\n" not in str(error.value)
