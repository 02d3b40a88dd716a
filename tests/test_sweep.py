"""`recipes-scaffold sweep`: one row per architecture, exact or with a one-line reason; JSON and markdown reports."""

import json
import re

import pytest
from conftest import run_cli

from scaffold.sweep import SweepRow, SweepRun, markdown_markers, write_markdown

MARKDOWN_START, MARKDOWN_END = markdown_markers("5.23.0")

ROW_KEYS = {"architecture", "generated", "tp1_exact", "tp2_exact", "seconds", "reason", "layer_types"}
# RWKV's forward takes its recurrent state in a parameter that is neither annotated nor used as a Cache: the
# generator refuses it before any checkpoint is built, so the failing row costs only its process start.
FAILING = "rwkv"


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    out = tmp_path_factory.mktemp("sweep")
    result = run_cli("-m", "scaffold.cli", "sweep", "--only", "llama", "--only", FAILING, "--tp", "1", "--jobs", "2",
                     "--json", str(out / "sweep.json"), "--markdown", str(out / "sweep.md"))
    return result, json.loads((out / "sweep.json").read_text()), (out / "sweep.md").read_text()


def test_json_has_a_row_per_architecture(swept):
    result, report, _ = swept
    assert result.returncode == 0, result.stderr
    assert set(report) == {"transformers_version", "date", "tp", "rows"}
    assert report["transformers_version"] == "5.23.0" and report["tp"] == 1
    assert [row["architecture"] for row in report["rows"]] == ["llama", FAILING]
    assert all(set(row) == ROW_KEYS for row in report["rows"])


def test_llama_is_generated_and_exact(swept):
    llama = swept[1]["rows"][0]
    assert llama["generated"] is True and llama["tp1_exact"] is True, llama
    assert llama["tp2_exact"] is None and llama["reason"] == ""


def test_failing_architecture_has_a_one_line_reason(swept):
    failing = swept[1]["rows"][1]
    assert failing["generated"] is False and failing["tp1_exact"] is None
    reason = failing["reason"]
    assert reason.startswith("generate: ") and "cache argument" in reason and "RwkvForCausalLM" in reason, reason
    assert "\n" not in reason and "Traceback" not in reason


def test_table_and_summary_are_printed(swept):
    result = swept[0]
    lines = result.stdout.splitlines()
    assert lines[0].split()[:2] == ["architecture", "generated"]
    assert re.fullmatch(r"llama\s+yes\s+yes\s+-\s+[\d.]+\s+-", lines[1]), lines[1]
    assert lines[-1] == "1/2 exact at TP=1, 0/2 at TP=2 (not run: --tp 2 runs it)"
    assert "[1/2] " in result.stderr and "[2/2] " in result.stderr


def test_markdown_has_header_summary_and_table(swept):
    markdown = swept[2]
    assert markdown.startswith(MARKDOWN_START) and markdown.rstrip().endswith(MARKDOWN_END)
    assert "transformers 5.23.0" in markdown and "`recipes-scaffold sweep --only llama" in markdown
    assert "**1/2 exact at TP=1, 0/2 at TP=2 (not run: --tp 2 runs it)**" in markdown
    assert "| llama | yes | yes | - |" in markdown


def test_markdown_replaces_only_the_block_between_the_markers(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(f"# Title\n\nbefore\n{MARKDOWN_START}\nold table\n{MARKDOWN_END}\nafter\n")
    run = SweepRun([SweepRow("llama", True, True, None, 1.0, "")], 1, "2030-01-01 00:00 UTC", "5.23.0",
                   "recipes-scaffold sweep --only llama")
    write_markdown(run, readme)
    text = readme.read_text()
    assert text.startswith(f"# Title\n\nbefore\n{MARKDOWN_START}\n") and text.endswith(f"{MARKDOWN_END}\nafter\n")
    assert "old table" not in text and "| llama | yes | yes | - | 1.0 | - |  |" in text


def test_a_timed_out_architecture_gets_a_row_not_a_crash(tmp_path):
    result = run_cli("-m", "scaffold.cli", "sweep", "--only", "llama", "--timeout", "1",
                     "--json", str(tmp_path / "sweep.json"))
    assert result.returncode == 0, result.stderr
    (row,) = json.loads((tmp_path / "sweep.json").read_text())["rows"]
    assert row["tp1_exact"] is None and row["reason"].endswith("timed out after 1 s"), row


@pytest.mark.parametrize("args, message", [
    (["--only", "nosuchmodel"], "--only nosuchmodel: not a model_type"),
    (["--tp", "3"], "--tp 3:"),
    (["--jobs", "0"], "--jobs 0:"),
])
def test_user_errors_are_one_line_and_exit_2(args, message):
    result = run_cli("-m", "scaffold.cli", "sweep", *args)
    assert result.returncode == 2
    assert result.stderr.startswith(f"error: {message}") and len(result.stderr.splitlines()) == 1, result.stderr


def test_markdown_keeps_one_block_per_transformers_release(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("# Title\n\nmy text\n")
    for version, exact in (("5.23.0", True), ("5.24.0", False), ("5.23.0", None)):
        run = SweepRun([SweepRow("llama", True, exact, None, 1.0, "")], 1, "2030-01-01 00:00 UTC", version,
                       "recipes-scaffold sweep --only llama")
        write_markdown(run, readme)
    text = readme.read_text()
    assert text.startswith("# Title\n\nmy text\n")
    assert text.count("transformers 5.23.0") == 1 and text.count("transformers 5.24.0") == 1
    assert "| llama | yes | - | - |" in text and "| llama | yes | no | - |" in text


def test_a_child_that_imports_another_transformers_release_fails_its_row(monkeypatch):
    import transformers

    from scaffold.sweep import SWEEP_TRANSFORMERS_VARIABLE, StepFailed, check_same_transformers

    monkeypatch.setenv(SWEEP_TRANSFORMERS_VARIABLE, "0.0.1")
    with pytest.raises(StepFailed, match=f"imports transformers {transformers.__version__}, the sweep reports 0.0.1"):
        check_same_transformers()
