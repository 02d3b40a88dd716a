"""The session's shared torchrun launch (scaffold.rank_pool): a failing request reports the ranks' error, the launch
after it verifies as a fresh one would, and ranks serving request after request do not grow."""

from pathlib import Path

import pytest

from scaffold.rank_pool import active_pool
from scaffold.verify import DistributedCase, build_tiny_checkpoint, verify_port_distributed_cases

RUNNER = "generated_models.llama.runner_llama:LlamaRunner"


def test_a_failed_request_raises_the_ranks_error_and_the_next_one_starts_a_fresh_launch(tmp_path):
    assert active_pool(2) is not None, "tests/conftest.py should share one launch across the session"
    checkpoint = build_tiny_checkpoint("llama", tmp_path / "llama")
    missing = tmp_path / "nowhere"
    with pytest.raises(RuntimeError, match="torchrun verification failed") as failure:
        verify_port_distributed_cases(RUNNER, {"missing": DistributedCase(missing)})
    assert str(missing) in str(failure.value).splitlines()[0]

    report = verify_port_distributed_cases(RUNNER, {"whole": DistributedCase(checkpoint)})["whole"]
    assert report.passed and report.world_size == 2, report.summary()


def _rank_threads(agent_pid: int) -> list[int]:
    children = Path(f"/proc/{agent_pid}/task/{agent_pid}/children").read_text().split()
    return [len(list(Path(f"/proc/{child}/task").iterdir())) for child in children]


def test_request_after_request_the_ranks_keep_their_thread_count(tmp_path):
    """Each runner used to make new gloo groups (threads of their own): a long-lived launch piled up hundreds."""
    checkpoint = build_tiny_checkpoint("llama", tmp_path / "llama")
    verify_port_distributed_cases(RUNNER, {"first": DistributedCase(checkpoint)})
    agent = active_pool(2)._process.pid
    after_first = _rank_threads(agent)
    for number in range(3):
        verify_port_distributed_cases(RUNNER, {f"again {number}": DistributedCase(checkpoint)})
    assert len(after_first) == 2 and _rank_threads(agent) == after_first
