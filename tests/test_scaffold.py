"""The generator: deterministic output identical to the committed port, clear errors, edits never lost."""

import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import COMMITTED_PORTS, REPO, git, run_cli

from scaffold.errors import ScaffoldError
from scaffold.pipeline import generate
from scaffold.write import PRISTINE_DIR, stamp

GPT_OSS_FILES = [
    "generated_models/__init__.py",
    "generated_models/gpt_oss/__init__.py",
    "generated_models/gpt_oss/modeling_gpt_oss.py",
    "generated_models/gpt_oss/runner_gpt_oss.py",
    "generated_models/gpt_oss/infer.py",
    "generated_models/gpt_oss/serve.py",
    "generated_models/gpt_oss/README.md",
    "config/gpt_oss.yaml",
    "tests/generated/test_gpt_oss.py",
]


def test_regeneration_is_byte_identical_to_the_committed_port(tmp_path):
    first, second = tmp_path / "first", tmp_path / "second"
    generate("gpt_oss", "transformers", first)
    generate("gpt_oss", "transformers", second)
    written = sorted(str(path.relative_to(first)) for path in first.rglob("*")
                     if path.is_file() and PRISTINE_DIR.parent not in path.relative_to(first).parents)
    assert written == sorted(GPT_OSS_FILES)
    for relative in GPT_OSS_FILES:
        fresh = (first / relative).read_bytes()
        assert fresh == (second / relative).read_bytes(), f"{relative} differs between two runs"
        assert fresh == (REPO / relative).read_bytes(), (
            f"{relative} differs from the committed port; regenerate with `recipes-scaffold gpt_oss --force`"
        )




@pytest.mark.parametrize("model", [name for name in COMMITTED_PORTS if name != "gpt_oss"])
def test_every_committed_port_regenerates_byte_identical(model, tmp_path):
    generate(model, "transformers", tmp_path)
    for path in (tmp_path / "generated_models" / model).iterdir():
        assert path.read_bytes() == (REPO / "generated_models" / model / path.name).read_bytes(), path.name
    for relative in (f"config/{model}.yaml", f"tests/generated/test_{model}.py"):
        assert (tmp_path / relative).read_bytes() == (REPO / relative).read_bytes(), relative


def test_every_generated_file_names_its_source_and_transformers_version(tmp_path):
    generate("gpt_oss", "transformers", tmp_path)
    for relative in GPT_OSS_FILES[1:]:  # not the package __init__ every port shares
        head = (tmp_path / relative).read_text().splitlines()[0]
        assert "transformers 5.23.0" in head and "modeling_gpt_oss.py" in head, relative


def test_generated_port_threads_runner_settings_and_prepares_inputs(tmp_path):
    generate("gpt_oss", "transformers", tmp_path)
    modeling = (tmp_path / "generated_models/gpt_oss/modeling_gpt_oss.py").read_text()
    assert "def __init__(self, config: GptOssConfig, runner_settings):" in modeling
    assert "self.model = GptOssModel(config, runner_settings=runner_settings)" in modeling
    assert "GptOssDecoderLayer(config, runner_settings, layer_idx)" in modeling
    assert "def prepare_inputs_for_generation(\n        self, input_ids, attention_mask, position_ids, cache_position" in modeling
    assert "kv_cache.set_write_slots(cache_position)" in modeling
    assert "from ..." not in modeling and "GptOssForSequenceClassification" not in modeling
    runner = (tmp_path / "generated_models/gpt_oss/runner_gpt_oss.py").read_text()
    for method in ("model_generate", "model_input_prepare", "model_output_process"):
        assert f"def {method}(" in runner
    assert "class GptOssRunner(ModelRunner):" in runner
    assert "model_class = GptOssForCausalLM" in runner and "config_class = GptOssConfig" in runner


def test_generator_parses_but_never_imports_the_model_source(tmp_path):
    probe = (
        "import sys; from pathlib import Path; from scaffold.pipeline import generate; "
        f"generate('gpt_oss', 'transformers', Path({str(tmp_path)!r})); "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('transformers', 'torch')))"
    )
    result = run_cli("-c", probe)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_unknown_model_is_one_line_with_suggestions():
    result = run_cli("-m", "scaffold.cli", "gpt_os", "--from", "transformers", "--out", "/tmp/never-written")
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert "no model named 'gpt_os'" in result.stderr and "gpt_oss" in result.stderr
    assert not Path("/tmp/never-written").exists()


def test_nosuchmodel_exits_nonzero_with_a_suggestion():
    result = run_cli("-m", "scaffold.cli", "nosuchmodel", "--from", "transformers")
    assert result.returncode == 2 and "did you mean" in result.stderr and result.stderr.count("\n") == 1


def test_several_models_from_one_folder_is_one_line(tmp_path):
    result = run_cli("-m", "scaffold.cli", "llama", "qwen3", "--from", str(tmp_path))
    assert result.returncode == 2 and result.stderr.count("\n") == 1
    assert "holds one model; give one name, not 2" in result.stderr


def test_edited_file_is_kept_unless_forced(tmp_path):
    generate("gpt_oss", "transformers", tmp_path)
    runner = tmp_path / "generated_models/gpt_oss/runner_gpt_oss.py"
    edited = runner.read_text() + "\n# my tuning note\n"
    runner.write_text(edited)
    with pytest.raises(ScaffoldError, match="refusing to overwrite .*runner_gpt_oss.py.*--upgrade.*--force"):
        generate("gpt_oss", "transformers", tmp_path)
    assert runner.read_text() == edited
    generate("gpt_oss", "transformers", tmp_path, force=True)
    assert "# my tuning note" not in runner.read_text()


def test_unedited_files_are_rewritten_and_identical_ones_left_alone(tmp_path):
    assert len(generate("gpt_oss", "transformers", tmp_path).report.written) == len(GPT_OSS_FILES)
    assert generate("gpt_oss", "transformers", tmp_path).report.written == []


def test_unwritable_output_folder_is_a_clear_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(ScaffoldError, match="cannot write under"):
        generate("gpt_oss", "transformers", blocker)


def _edit_line(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new))


def _generator_rewords_runner(monkeypatch, wording: str) -> None:
    """From now on the generator writes `wording` in the runner's docstring: a change in its output."""
    import scaffold.pipeline

    original_port_files = scaffold.pipeline.port_files

    def changed_generator(spec):
        files = original_port_files(spec)
        path = "generated_models/gpt_oss/runner_gpt_oss.py"
        files[path] = files[path].replace("greedy decoding of a left-padded batch", wording)
        return files

    monkeypatch.setattr(scaffold.pipeline, "port_files", changed_generator)


def test_upgrade_merges_edits_into_new_output(tmp_path, monkeypatch):
    generate("gpt_oss", "transformers", tmp_path)
    runner = tmp_path / "generated_models/gpt_oss/runner_gpt_oss.py"
    _edit_line(runner, "        input_dict[\"input_ids\"] = next_tokens[:, None]\n",
               "        input_dict[\"input_ids\"] = next_tokens[:, None]  # my edit\n")

    _generator_rewords_runner(monkeypatch, "greedy decoding (new wording)")
    with pytest.raises(ScaffoldError, match="refusing to overwrite"):
        generate("gpt_oss", "transformers", tmp_path)
    report = generate("gpt_oss", "transformers", tmp_path, upgrade=True).report
    merged = runner.read_text()
    assert "# my edit" in merged and "greedy decoding (new wording)" in merged
    assert report.merged == [runner] and report.conflicted == []
    assert "<<<<<<<" not in merged


def test_upgrade_conflict_is_marked_and_reported(tmp_path, monkeypatch):
    generate("gpt_oss", "transformers", tmp_path)
    runner = tmp_path / "generated_models/gpt_oss/runner_gpt_oss.py"
    _edit_line(runner, "greedy decoding of a left-padded batch", "greedy decoding, my wording")

    _generator_rewords_runner(monkeypatch, "greedy decoding, new wording")
    report = generate("gpt_oss", "transformers", tmp_path, upgrade=True).report
    merged = runner.read_text()
    assert report.conflicted == [runner]
    assert "<<<<<<<" in merged and "my wording" in merged and "new wording" in merged


def _commit_all(folder: Path) -> None:
    git(folder, "add", "-A")
    git(folder, "commit", "-q", "-m", "port")


def _port_committed_as_generated_earlier(repository: Path, runner_wording: str) -> Path:
    """A git repository whose committed gpt_oss port was written by an earlier generator that put
    `runner_wording` in the runner's docstring; returns the runner's path."""
    git(repository.parent, "init", "-q", repository.name)
    generate("gpt_oss", "transformers", repository)
    runner = repository / "generated_models/gpt_oss/runner_gpt_oss.py"
    relative = str(runner.relative_to(repository))
    text = runner.read_text()
    header_end = text.index("\n", text.index("recipes-scaffold-sha256:")) + 1
    old_body = text[header_end:].replace("greedy decoding of a left-padded batch", runner_wording)
    header = [line.removeprefix("# ") for line in text[:header_end].splitlines()[:-1]]
    runner.write_text(stamp(relative, header, old_body))
    _commit_all(repository)
    return runner


def test_upgrade_finds_its_base_in_a_fresh_clone(tmp_path):
    _port_committed_as_generated_earlier(tmp_path / "origin", "greedy decoding (old wording)")
    git(tmp_path, "clone", "-q", "origin", "clone")
    clone = tmp_path / "clone"
    assert not (clone / PRISTINE_DIR).exists()
    runner = clone / "generated_models/gpt_oss/runner_gpt_oss.py"
    _edit_line(runner, "        input_dict[\"input_ids\"] = next_tokens[:, None]\n",
               "        input_dict[\"input_ids\"] = next_tokens[:, None]  # my edit\n")
    report = generate("gpt_oss", "transformers", clone, upgrade=True).report
    merged = runner.read_text()
    assert report.merged == [runner] and report.conflicted == []
    assert "# my edit" in merged and "greedy decoding of a left-padded batch" in merged and "old wording" not in merged


def test_upgrade_cli_exits_nonzero_on_conflict(tmp_path):
    runner = _port_committed_as_generated_earlier(tmp_path / "repository", "greedy decoding (old wording)")
    shutil.rmtree(tmp_path / "repository" / PRISTINE_DIR)
    _edit_line(runner, "greedy decoding (old wording)", "greedy decoding (my wording)")
    result = run_cli("-m", "scaffold.cli", "gpt_oss", "--out", str(tmp_path / "repository"), "--upgrade")
    assert result.returncode == 1 and "conflicts to resolve" in result.stderr
    assert "<<<<<<<" in runner.read_text() and "my wording" in runner.read_text()


def test_upgrade_without_a_base_is_one_clear_error(tmp_path):
    generate("gpt_oss", "transformers", tmp_path)
    shutil.rmtree(tmp_path / PRISTINE_DIR)
    runner = tmp_path / "generated_models/gpt_oss/runner_gpt_oss.py"
    edited = runner.read_text() + "\n# my tuning note\n"
    runner.write_text(edited)
    result = run_cli("-m", "scaffold.cli", "gpt_oss", "--out", str(tmp_path), "--upgrade")
    assert result.returncode == 2 and result.stderr.count("\n") == 1
    assert "cannot --upgrade generated_models/gpt_oss/runner_gpt_oss.py" in result.stderr
    assert "neither the git history" in result.stderr
    assert runner.read_text() == edited


def test_local_copies_of_generated_files_are_never_committed(tmp_path):
    git(tmp_path.parent, "init", "-q", tmp_path.name)
    generate("gpt_oss", "transformers", tmp_path)
    status = subprocess.run(["git", "-C", str(tmp_path), "status", "--porcelain", "--untracked-files=all"],
                            capture_output=True, text=True, check=True).stdout
    assert ".recipes-scaffold" not in status and "runner_gpt_oss.py" in status


def _remote_code_folder(folder: Path, marker: Path) -> Path:
    """A trust_remote_code-style copy of gpt_oss whose files would write `marker` if anyone imported them."""
    import transformers

    source = Path(transformers.__file__).parent / "models/gpt_oss"
    folder.mkdir()
    booby_trap = f"open({str(marker)!r}, 'w').write('executed')\n"
    for kind in ("modeling", "configuration"):
        text = (source / f"{kind}_gpt_oss.py").read_text()
        text = text.replace("from ... import", "from transformers import")
        text = text.replace("from ...", "from transformers.").replace("from .configuration_gpt_oss",
                                                                     "from .configuration_tinyoss")
        (folder / f"{kind}_tinyoss.py").write_text(booby_trap + text)
    (folder / "config.json").write_text('{"model_type": "gpt_oss", "architectures": ["GptOssForCausalLM"]}')
    return folder


def test_scaffolding_from_a_folder_never_executes_its_code(tmp_path):
    marker = tmp_path / "EXECUTED"
    folder = _remote_code_folder(tmp_path / "tinyoss_model", marker)
    result = run_cli("-m", "scaffold.cli", "tinyoss", "--from", str(folder), "--out", str(tmp_path / "out"))
    assert result.returncode == 0, result.stderr
    assert not marker.exists()
    port = tmp_path / "out/generated_models/tinyoss"
    assert (port / "modeling_tinyoss.py").is_file() and (port / "configuration_tinyoss.py").is_file()
    runner = (port / "runner_tinyoss.py").read_text()
    assert "from generated_models.tinyoss.configuration_tinyoss import GptOssConfig" in runner


@pytest.mark.parametrize("model", COMMITTED_PORTS)
def test_committed_ports_keep_no_hf_surface_the_runtime_contradicts(model):
    modeling = (REPO / f"generated_models/{model}/modeling_{model}.py").read_text()
    assert "_tp_plan" not in modeling and "_pp_plan" not in modeling
    assert "from_pretrained(" not in modeling


def test_a_docstring_keeps_its_text_and_loses_its_from_pretrained_example():
    import libcst as cst

    from scaffold.transform import DropHfSurfaceCommand

    source = (
        "class A(Base):\n"
        "    _tp_plan = {\"lm_head\": \"colwise_gather_output\"}\n"
        "    kept = 1\n\n"
        "    def forward(self, labels=None):\n"
        "        r\"\"\"\n"
        "        labels (`torch.LongTensor`):\n"
        "            Labels for the loss.\n\n"
        "        Example:\n\n"
        "        >>> model = A.from_pretrained(\"x\")\n"
        "        \"\"\"\n"
        "        return 1\n"
    )
    ported = DropHfSurfaceCommand(None).transform_module_impl(cst.parse_module(source)).code
    assert ported == (
        "class A(Base):\n"
        "    kept = 1\n\n"
        "    def forward(self, labels=None):\n"
        "        r\"\"\"\n"
        "        labels (`torch.LongTensor`):\n"
        "            Labels for the loss.\n"
        "        \"\"\"\n"
        "        return 1\n"
    )
