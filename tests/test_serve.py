"""The OpenAI-compatible server on a tiny llama: the official `openai` client, continuous batching that leaves each
greedy answer as it is alone (TP=1 and TP=2), bad requests answered 4xx while others run, a client that leaves
mid-stream, a full queue, and SIGTERM under load."""

import json
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx2 as httpx
import openai
import pytest
import yaml

from conftest import REPO
from core.sampling import SamplingParams
from generated_models.llama.runner_llama import LlamaRunner
from scaffold.verify import build_tiny_checkpoint, verification_settings

API_KEY = "test-key"
PROMPTS = ["Hello", "The quick brown fox jumps over the lazy dog", "In a hole in the ground there lived a hobbit",
           "What is the capital of France?", "Write a haiku about the sea.", "Numbers: 0 1 2 3",
           "Explain what a language model is.", "Tensor parallel layers split each weight"]
TOLERANCE = 1e-4


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Server:
    def __init__(self, folder, checkpoint, batch_size=4, max_new_tokens=16, world_size=1, *extra):
        config = folder / "serve.yaml"
        parallel = {f"{group}_size": world_size for group in ("attn_tp", "moe_tp", "lmhead_tp", "embed_tp")}
        config.write_text(yaml.safe_dump({
            "model_name": "llama", "model_path": str(checkpoint), "world_size": world_size,
            "model_config": {"dtype": "float32", "device": "cpu"}, "parallel_config": parallel,
            "data_config": {"batch_size": batch_size, "input_max_len": 32, "max_new_tokens": max_new_tokens},
        }))
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={world_size}"]
                    if world_size > 1 else [sys.executable])
        self.log = open(folder / "server.log", "w")
        self.process = subprocess.Popen(
            [*launcher, "-m", "generated_models.llama.serve", "--config", str(config), "--port", str(self.port),
             *extra], cwd=REPO, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            assert self.process.poll() is None, (folder / "server.log").read_text()[-3000:]
            try:
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.2)
        raise TimeoutError((folder / "server.log").read_text()[-3000:])

    def health(self) -> dict:
        return httpx.get(f"{self.url}/health").json()

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        code = self.process.wait(timeout=60)
        self.log.close()
        return code


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    return build_tiny_checkpoint("llama", tmp_path_factory.mktemp("llama_serve"))


@pytest.fixture(scope="module")
def server(tiny_llama, tmp_path_factory):
    running = Server(tmp_path_factory.mktemp("server"), tiny_llama, 4, 16, 1, "--api-key", API_KEY)
    yield running
    assert running.stop() == 0


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0)


@pytest.fixture(scope="module")
def alone(tiny_llama):
    """Each prompt's greedy tokens and logits when it runs alone (batch 1), from the runner in this process."""
    runner = LlamaRunner(verification_settings(LlamaRunner, tiny_llama, 1, 16, {"data_config": {"input_max_len": 32}}))
    runner.init_model()
    return {prompt: runner.model_generate([prompt], sampling=SamplingParams(), keep_logits=True) for prompt in PROMPTS}


def test_openai_client_chat_and_completion_streamed_and_whole(client):
    assert [model.id for model in client.models.list().data] == ["llama"]
    chat = client.chat.completions.create(model="llama", messages=[{"role": "user", "content": "Hi"}], max_tokens=5)
    assert chat.choices[0].finish_reason in ("stop", "length") and chat.usage.completion_tokens <= 5
    assert chat.usage.total_tokens == chat.usage.prompt_tokens + chat.usage.completion_tokens
    streamed = client.chat.completions.create(model="llama", messages=[{"role": "user", "content": "Hi"}],
                                              max_tokens=5, stream=True)
    chunks = list(streamed)
    assert "".join(chunk.choices[0].delta.content or "" for chunk in chunks) == chat.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == chat.choices[0].finish_reason
    completion = client.completions.create(model="llama", prompt=PROMPTS[1], max_tokens=7)
    pieces = list(client.completions.create(model="llama", prompt=PROMPTS[1], max_tokens=7, stream=True,
                                            stream_options={"include_usage": True}))
    assert "".join(piece.choices[0].text for piece in pieces if piece.choices) == completion.choices[0].text
    assert pieces[-1].usage.completion_tokens == completion.usage.completion_tokens


def first_difference_is_a_near_tie(tokens, reference) -> tuple[bool, str]:
    expected = reference.output_token_ids[0]
    for step, (got, want) in enumerate(zip(tokens, expected)):
        if got != want:
            top2 = reference.step_logits[step][0].topk(2).values
            gap = float(top2[0] - top2[1])
            return gap < TOLERANCE, f"step {step}: alone {want}, batched {got}, top-2 gap {gap:.2e}"
    return len(tokens) == len(expected), "" if len(tokens) == len(expected) else f"{len(tokens)} vs {len(expected)}"


def concurrent_greedy(url, headers=None) -> dict[str, list[int]]:
    """Every prompt twice at once (more requests than rows: they queue, join and leave the batch)."""
    results = {}

    def ask(index, prompt):
        body = {"model": "llama", "prompt": prompt, "max_tokens": 16, "temperature": 0, "return_token_ids": True}
        response = httpx.post(f"{url}/v1/completions", json=body, headers=headers, timeout=120)
        assert response.status_code == 200, response.text
        results[index, prompt] = response.json()["choices"][0]["token_ids"]

    threads = [threading.Thread(target=ask, args=(index, prompt)) for index in range(2) for prompt in PROMPTS]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results


def test_concurrent_greedy_answers_equal_each_alone(server, alone, measurements):
    results = concurrent_greedy(server.url, {"Authorization": f"Bearer {API_KEY}"})
    verdicts = [first_difference_is_a_near_tie(tokens, alone[prompt]) for (_, prompt), tokens in results.items()]
    measurements.append(f"serve TP=1: {len(results)} concurrent greedy requests on 4 rows, "
                        f"{sum(bool(note) for _, note in verdicts)} differ from alone (near ties only)")
    assert all(ok for ok, _ in verdicts), [note for _, note in verdicts]


@pytest.mark.parametrize("headers, body, status, message", [
    ({}, b"{not json", 400, "not valid JSON"),
    ({}, {"model": "gpt-4", "prompt": "Hi"}, 404, "The model 'gpt-4' does not exist"),
    ({}, {"model": "llama", "prompt": "Hi", "max_tokens": 999}, 400, "max_tokens must be an integer from 1 to 16"),
    ({}, {"model": "llama", "prompt": "Hi", "max_tokens": 0}, 400, "max_tokens must be an integer from 1 to 16"),
    ({}, {"model": "llama", "prompt": "word " * 40}, 400, "this server takes at most 32"),
    ({}, {"model": "llama", "prompt": "Hi", "temperature": -1}, 400, "temperature must be at least 0"),
    ({"Authorization": "Bearer wrong"}, {"model": "llama", "prompt": "Hi"}, 401, "Incorrect API key"),
])
def test_bad_requests_get_openai_errors_while_others_run(server, headers, body, status, message):
    answers = []
    streams = [threading.Thread(target=lambda: answers.append(httpx.post(
        f"{server.url}/v1/completions", json={"model": "llama", "prompt": "Hello", "max_tokens": 16, "stream": True},
        headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60))) for _ in range(3)]
    for stream in streams:
        stream.start()
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    response = httpx.post(f"{server.url}/v1/completions", content=content,
                          headers={"Authorization": f"Bearer {API_KEY}", **headers}, timeout=60)
    for stream in streams:
        stream.join()
    assert response.status_code == status and message in response.json()["error"]["message"], response.text
    assert [answer.status_code for answer in answers] == [200] * 3
    assert all(answer.text.endswith("data: [DONE]\n\n") for answer in answers)


def test_client_leaving_mid_stream_frees_its_row(server):
    with httpx.stream("POST", f"{server.url}/v1/completions", timeout=60,
                      headers={"Authorization": f"Bearer {API_KEY}"},
                      json={"model": "llama", "prompt": "Hello", "max_tokens": 16, "stream": True}) as response:
        next(response.iter_lines())
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and server.health()["free_rows"] != 4:
        time.sleep(0.05)
    assert server.health() == {"status": "ok", "running": 0, "waiting": 0, "free_rows": 4}


def test_full_queue_is_429_and_sigterm_finishes_what_runs(tiny_llama, tmp_path):
    """Two rows, no queue: a third request is refused with 429. SIGTERM while two run: both finish, then exit."""
    server = Server(tmp_path, tiny_llama, 2, 256, 1, "--max-waiting", "0")
    answers = []

    def ask():
        answers.append(httpx.post(f"{server.url}/v1/completions", timeout=120,
                                  json={"model": "llama", "prompt": "Hello", "max_tokens": 256, "temperature": 0}))

    running = [threading.Thread(target=ask) for _ in range(2)]
    for thread in running:
        thread.start()
    while server.health()["running"] < 2:
        time.sleep(0.01)
    refused = httpx.post(f"{server.url}/v1/completions", json={"model": "llama", "prompt": "Hi"}, timeout=60)
    server.process.send_signal(signal.SIGTERM)
    for thread in running:
        thread.join()
    assert server.process.wait(timeout=60) == 0  # one signal: a second one while it tidies up would kill it
    server.log.close()
    assert refused.status_code == 429 and refused.json()["error"]["type"] == "rate_limit_exceeded"
    assert [answer.status_code for answer in answers] == [200, 200]
    assert all(answer.json()["usage"]["completion_tokens"] > 0 for answer in answers)
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{server.url}/health")


def test_tp2_concurrent_greedy_answers_equal_each_alone(tiny_llama, tmp_path, alone, measurements):
    server = Server(tmp_path, tiny_llama, 4, 16, 2)
    try:
        results = concurrent_greedy(server.url)
    finally:
        server.stop()  # torchrun itself, signalled, exits 1 after its ranks stop
    assert "stopped" in (tmp_path / "server.log").read_text()
    verdicts = [first_difference_is_a_near_tie(tokens, alone[prompt]) for (_, prompt), tokens in results.items()]
    measurements.append(f"serve TP=2: {len(results)} concurrent greedy requests on 4 rows, "
                        f"{sum(bool(note) for _, note in verdicts)} differ from TP=1 alone (near ties only)")
    assert all(ok for ok, _ in verdicts), [note for _, note in verdicts]


def test_inductor_decodes_every_mix_of_rows_with_one_graph(tiny_llama, alone, measurements):
    """Sequences join and leave a compiled batch at different steps (prefills run eagerly): nothing
    recompiles after the warm-up, and each greedy answer is still its alone answer."""
    from core.model_runner import compiled_graphs
    from core.serve import warm_up
    from core.serving.engine import Engine, Sequence

    runner = LlamaRunner(verification_settings(LlamaRunner, tiny_llama, 3, 16, {
        "exe_mode": "inductor", "data_config": {"input_max_len": 32}}))
    runner.init_model()
    engine = Engine(runner)
    warm_up(engine)
    frames = compiled_graphs()
    sequences = {}
    arrivals = {0: PROMPTS[:2], 3: PROMPTS[2:5], 9: PROMPTS[5:]}
    step = 0
    while step <= max(arrivals) or engine.busy():
        for prompt in arrivals.get(step, []):
            sequences[prompt] = Sequence(prompt, runner.tokenizer(prompt)["input_ids"], 5 + len(prompt) % 7,
                                         SamplingParams(), emit=lambda event: None)
            engine.submit(sequences[prompt])
        engine.step()
        step += 1
    recompiles = compiled_graphs() - frames
    measurements.append(f"serve inductor: {len(PROMPTS)} sequences joining at steps 0/3/9 over 3 rows, "
                        f"{recompiles} recompiles after warm-up")
    assert recompiles == 0
    for prompt, sequence in sequences.items():
        assert sequence.finish_reason is not None
        reference = alone[prompt]
        expected = reference.output_token_ids[0][: len(sequence.output_ids)]
        differs = [step for step, (got, want) in enumerate(zip(sequence.output_ids, expected)) if got != want]
        assert not differs or float(reference.step_logits[differs[0]][0].topk(2).values.diff().abs()) < TOLERANCE


def test_a_failed_step_ends_its_sequences_with_an_error_and_the_engine_goes_on(tiny_llama):
    from core.serving.engine import Engine, Sequence

    runner = LlamaRunner(verification_settings(LlamaRunner, tiny_llama, 2, 16, {"data_config": {"input_max_len": 32}}))
    runner.init_model()
    engine = Engine(runner)
    events = []
    failing = Sequence("a", runner.tokenizer("Hello")["input_ids"], 8, SamplingParams(), emit=events.append)
    engine.submit(failing)
    engine.batch.decode = lambda *args: (_ for _ in ()).throw(RuntimeError("device lost"))
    stopping = threading.Event()
    stopping.set()
    engine.run(stopping)
    assert events[-1].finish_reason == "error" and "device lost" in events[-1].text
    assert engine.free_rows() == 2
    del engine.batch.decode
    healthy = Sequence("b", runner.tokenizer("Hello")["input_ids"], 4, SamplingParams(), emit=events.append)
    engine.submit(healthy)
    engine.run(stopping)
    assert healthy.finish_reason in ("stop", "length") and engine.free_rows() == 2


def test_rows_move_back_when_the_shared_slot_reaches_the_cache_end(tiny_llama, alone, monkeypatch):
    """A cache of 2 x (32 + 8) slots and 40 sequences of 8 tokens over 2 rows: the shared slot reaches the end
    several times; every answer is still its alone answer."""
    from core.serving.engine import Engine, RowBatch, Sequence

    runner = LlamaRunner(verification_settings(LlamaRunner, tiny_llama, 2, 8, {"data_config": {"input_max_len": 32}}))
    runner.init_model()
    compactions = []
    original = RowBatch.compact
    monkeypatch.setattr(RowBatch, "compact", lambda batch, keep: compactions.append(keep) or original(batch, keep))
    engine = Engine(runner)
    sequences = [Sequence(str(index), runner.tokenizer(prompt)["input_ids"], 8, SamplingParams(), lambda event: None,
                          ignore_eos=True) for index, prompt in enumerate(PROMPTS * 5)]
    for sequence in sequences:
        engine.submit(sequence)
    stopping = threading.Event()
    stopping.set()
    engine.run(stopping)
    assert len(compactions) >= 2
    for sequence, prompt in zip(sequences, PROMPTS * 5):
        expected = alone[prompt].output_token_ids[0][:8]
        differs = [step for step, (got, want) in enumerate(zip(sequence.output_ids, expected)) if got != want]
        gap = float(alone[prompt].step_logits[differs[0]][0].topk(2).values.diff().abs()) if differs else 0.0
        assert len(sequence.output_ids) == 8 and gap < TOLERANCE, (prompt, sequence.output_ids, expected)
