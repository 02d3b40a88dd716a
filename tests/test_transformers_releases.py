"""The generator and core across the transformers releases the project supports (tests/transformers_releases.py).

The committed ports are generated from the oldest proven release; here they are upgraded, with a user's edit, to
the newest and verified there against HF eager (all at TP=1, a few at TP=2 too), and a sweep subset runs there. The
generator finds what it needs by role, and stops with one line on what it does not understand.
"""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import transformers
from conftest import COMMITTED_PORTS, REPO, git, run_cli
from packaging.requirements import Requirement
from transformers_releases import PROVEN_RELEASES, environment, python_path_for

from scaffold.pipeline import generate

NEWEST = PROVEN_RELEASES[-1]
# Architectures beyond the committed ports whose rules touch the cache and attention: an indexer key cache beside
# the KV cache (deepseek_v32), and parameters and layers 5.24.0 builds with an explicit `dtype=` (flint's sinks,
# hy_v4's LM head). tests/test_generator_rules.py proves more rules under the pinned release.
SWEEP_SUBSET = ("deepseek_v32", "flint", "hy_v4")
# Every committed port is verified at TP=1; these, whose tensor-parallel layouts differ most (experts with sinks
# and MXFP4, MLA with block-FP8), also at TP=2 online, offline and with a replicated KV head.
TP2_PORTS = ("gpt_oss", "deepseek_v3")
USER_EDIT = (
    "        self.intermediate_size = config.intermediate_size\n",
    "        self.intermediate_size = config.intermediate_size  # my edit: NPU kernels like multiples of 256\n",
)


def _run(command: list[str], cwd: Path, version: str, *first_on_path: Path, timeout: float = 900):
    return subprocess.run(
        command, cwd=cwd, env=environment(version, *first_on_path), capture_output=True, text=True, timeout=timeout
    )


def test_pyproject_accepts_every_proven_release():
    declared = re.search(r'^\s*"(transformers[^"]*)",', (REPO / "pyproject.toml").read_text(), re.MULTILINE)
    requirement = Requirement(declared.group(1))
    assert all(requirement.specifier.contains(version) for version in PROVEN_RELEASES), str(requirement)
    assert transformers.__version__ in PROVEN_RELEASES
    pinned = re.search(r"^PINNED_TRANSFORMERS := (\S+)$", (REPO / "Makefile").read_text(), re.MULTILINE).group(1)
    assert pinned == PROVEN_RELEASES[0], "make installs the release the committed ports are generated from"


def _llama_folder(folder: Path, rewrite) -> Path:
    """A remote-code folder holding HF llama's files, with `rewrite` applied to the modeling file."""
    source = Path(transformers.__file__).parent / "models/llama"
    folder.mkdir()
    for kind in ("configuration", "modeling"):
        text = (source / f"{kind}_llama.py").read_text().replace("from ... import", "from transformers import")
        text = text.replace("from ...", "from transformers.").replace(
            ".configuration_llama", ".configuration_tinyllama"
        )
        (folder / f"{kind}_tinyllama.py").write_text(rewrite(text) if kind == "modeling" else text)
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}))
    return folder


def test_the_cache_argument_is_found_by_its_annotation_whatever_its_name(tmp_path):
    folder = _llama_folder(tmp_path / "renamed", lambda text: re.sub(r"\bpast_key_values\b", "memory", text))
    generate("tinyllama", str(folder), tmp_path / "out")
    modeling = (tmp_path / "out/generated_models/tinyllama/modeling_tinyllama.py").read_text()
    assert '"memory": kv_cache,' in modeling and '"past_key_values"' not in modeling


def test_a_construct_the_generator_does_not_understand_stops_it_with_one_line(tmp_path):
    # As a future release might: the cache gets a new type and a new interface.
    folder = _llama_folder(
        tmp_path / "future",
        lambda text: text.replace("Cache | None", "KVStore | None").replace(".get_seq_length(", ".seq_len("),
    )
    out = tmp_path / "out"
    result = run_cli("-m", "scaffold.cli", "tinyllama", "--from", str(folder), "--out", str(out))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.count("\n") == 1, result.stderr
    assert (
        f"error: rule 'cache argument' does not understand LlamaForCausalLM.forward's cache parameter "
        f"(candidates: none annotated `Cache` or used as one) in future/modeling_tinyllama.py "
        f"(transformers {transformers.__version__}); no file was written"
    ) in result.stderr
    assert not out.exists()


@pytest.fixture(scope="module")
def upgraded_repository(tmp_path_factory) -> Path:
    """A git repository holding the committed ports, llama's modeling file edited by its user, then every port
    regenerated with `--upgrade` under the newest release."""
    header = (REPO / "generated_models/llama/runner_llama.py").read_text().splitlines()[0]
    assert f"transformers {PROVEN_RELEASES[0]}:" in header, "the committed ports come from the oldest release"
    repository = tmp_path_factory.mktemp("releases") / "my_ports"
    for port in COMMITTED_PORTS:
        shutil.copytree(REPO / "generated_models" / port, repository / "generated_models" / port,
                        ignore=shutil.ignore_patterns("__pycache__"))
        for relative in (f"config/{port}.yaml", f"tests/generated/test_{port}.py"):
            (repository / relative).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(REPO / relative, repository / relative)
    shutil.copyfile(REPO / "generated_models/__init__.py", repository / "generated_models/__init__.py")
    git(repository, "init", "-q")
    git(repository, "add", "-A")
    git(repository, "commit", "-q", "-m", f"ports generated from transformers {PROVEN_RELEASES[0]}")
    modeling = repository / "generated_models/llama/modeling_llama.py"
    modeling.write_text(modeling.read_text().replace(*USER_EDIT))
    git(repository, "commit", "-q", "-am", "my edit")
    result = _run([sys.executable, "-m", "scaffold.cli", *COMMITTED_PORTS, "--upgrade", "--out", str(repository)],
                  repository, NEWEST)
    assert result.returncode == 0, result.stderr
    return repository


def test_upgrading_to_the_newest_release_keeps_the_users_edit(upgraded_repository):
    modeling = (upgraded_repository / "generated_models/llama/modeling_llama.py").read_text()
    assert USER_EDIT[1] in modeling and "<<<<<<<" not in modeling
    assert f"from transformers {NEWEST}:" in modeling.splitlines()[0]


def test_every_committed_port_regenerated_under_the_newest_release_matches_hf(upgraded_repository, measurements):
    """Each port's own generated regression test, run with the newest release's transformers against HF eager of
    that release: every test of the TP2_PORTS, the TP=1 verification of the others."""
    assert set(TP2_PORTS) <= set(COMMITTED_PORTS)
    selected = [f"tests/generated/test_{port}.py" if port in TP2_PORTS
                else f"tests/generated/test_{port}.py::test_port_matches_hf_eager" for port in COMMITTED_PORTS]
    result = _run(
        [sys.executable, "-m", "pytest", "-q", "-p", "conftest", "-p", "no:cacheprovider", *selected],
        upgraded_repository,
        NEWEST,
        upgraded_repository,
        REPO / "tests",
    )
    differences = [float(found) for found in re.findall(r"max \|port - HF\| = (\S+) ", result.stdout)]
    summary = result.stdout.strip().splitlines()[-1] if result.stdout.strip() else result.stderr[-2000:]
    measurements.append(
        f"transformers {NEWEST}, the {len(COMMITTED_PORTS)} committed ports upgraded and verified "
        f"(TP=1 and TP=2 cases: {len(differences)}, max |port - HF| {max(differences, default=0):.2e}): "
        f"{summary}"
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]


def test_a_sweep_subset_is_exact_under_the_newest_release(tmp_path, measurements):
    """Run as a user would, from the repository with a relative PYTHONPATH: every child must import that release."""
    report = tmp_path / "sweep.json"
    only = [argument for architecture in SWEEP_SUBSET for argument in ("--only", architecture)]
    relative = [os.path.relpath(entry, REPO) for entry in python_path_for(NEWEST)]
    result = subprocess.run(
        [sys.executable, "-m", "scaffold.cli", "sweep", "--tp", "2", "--jobs", "2", "--json", str(report), *only],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(relative)},
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    run = json.loads(report.read_text())
    assert run["transformers_version"] == NEWEST
    rows = {row["architecture"]: row for row in run["rows"]}
    measurements.append(
        f"transformers {NEWEST} sweep subset: "
        + ", ".join(f"{name} TP=1 {row['tp1_exact']} TP=2 {row['tp2_exact']}" for name, row in rows.items())
    )
    assert all(row["tp1_exact"] and row["tp2_exact"] for row in rows.values()), {
        name: row["reason"] for name, row in rows.items() if row["reason"]
    }
