"""`recipes-scaffold NAME --from DIR` on a trust_remote_code-style checkpoint: a folder holding config.json,
configuration_*.py, modeling_*.py and the weights. Here: a renamed copy of HF's llama ("Minillama") with a tiny
random checkpoint. The port must match HF eager running the folder's own code, at TP=1 and TP=2."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import transformers

from scaffold.verify import build_tiny_checkpoint

NAME = "minillama"


def _renamed(text: str) -> str:
    text = re.sub(r"\bLlama", "Minillama", text)
    text = text.replace('model_type = "llama"', f'model_type = "{NAME}"')
    text = text.replace("from .configuration_llama import", f"from .configuration_{NAME} import")
    # Relative imports of transformers' own modules become absolute: the folder is not inside transformers.
    text = text.replace("from ... import", "from transformers import")
    return text.replace("from ...", "from transformers.")


@pytest.fixture(scope="module")
def remote_code_checkpoint(tmp_path_factory) -> Path:
    folder = build_tiny_checkpoint("llama", tmp_path_factory.mktemp("remote_code") / NAME)
    source = Path(transformers.__file__).parent / "models/llama"
    for kind in ("configuration", "modeling"):
        (folder / f"{kind}_{NAME}.py").write_text(_renamed((source / f"{kind}_llama.py").read_text()))
    config = json.loads((folder / "config.json").read_text())
    config.update(model_type=NAME, architectures=["MinillamaForCausalLM"], auto_map={
        "AutoConfig": f"configuration_{NAME}.MinillamaConfig",
        "AutoModelForCausalLM": f"modeling_{NAME}.MinillamaForCausalLM",
    })
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return folder


@pytest.fixture(scope="module")
def port_root(remote_code_checkpoint, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("port")
    result = subprocess.run([sys.executable, "-m", "scaffold.cli", NAME, "--from", str(remote_code_checkpoint),
                             "--out", str(root)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return root


# Run from the port's root, so that `generated_models` is the package just written there.
VERIFY = """
import json, sys
from scaffold.verify import DistributedCase, verify_port, verify_port_distributed_cases
from generated_models.minillama.runner_minillama import MinillamaRunner
checkpoint, out = sys.argv[1:]
reports = {"tp1": verify_port(MinillamaRunner, checkpoint)}
reports.update(verify_port_distributed_cases("generated_models.minillama.runner_minillama:MinillamaRunner",
                                             {"tp2": DistributedCase(checkpoint)}))
open(out, "w").write(json.dumps({name: [report.passed, report.summary()] for name, report in reports.items()}))
"""


def test_folder_port_names_its_source_folder(port_root):
    modeling = (port_root / f"generated_models/{NAME}/modeling_{NAME}.py").read_text()
    assert f"recipes-scaffold {NAME} --from {NAME}/" in modeling
    assert f"from generated_models.{NAME}.configuration_{NAME} import MinillamaConfig" in modeling


def test_folder_port_matches_hf_eager_running_the_folders_code(port_root, remote_code_checkpoint, tmp_path,
                                                                measurements):
    reports_path = tmp_path / "reports.json"
    result = subprocess.run([sys.executable, "-c", VERIFY, str(remote_code_checkpoint), str(reports_path)],
                            cwd=port_root, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    reports = json.loads(reports_path.read_text())
    for name, (passed, summary) in reports.items():
        measurements.append(f"--from DIR ({NAME}) {name}: {summary}")
        assert passed, summary
