"""`recipes-scaffold sweep`: try the generator on every causal LM of the installed transformers.

For each model_type of HF's causal-LM auto mapping: generate the port of the class the mapping names, build a tiny
random checkpoint with HF's own class and prove the port against HF eager (TP=1, and TP=2 with `--tp 2`). The
result is a table with a one-line reason for every architecture that is not exact, so that the generator's
limitations can be ranked by how many architectures each one blocks.

Each architecture runs in a child process (`python -m scaffold.sweep --one MODEL_TYPE ...`): the port it
generates is a `generated_models` package that must shadow the repository's committed one, and a crash, a hang
or a memory blow-up in one architecture must not take the sweep down.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import difflib
import importlib
import importlib.metadata
import json
import os
import re
import resource
import shlex
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from core.cli import exit_on_user_error
from scaffold.errors import ScaffoldError

DEFAULT_TIMEOUT_S = 300
# Tiny configs keep some full-size dimensions (expert counts, LoRA ranks, …): cap each child so one of them
# cannot exhaust the machine's memory and have the kernel kill a neighbour instead.
CHILD_MEMORY_LIMIT_BYTES = 8 * 2**30
REASON_MAX_CHARS = 240
REPO_ROOT = Path(__file__).resolve().parent.parent
PORT_DIR, ROW_FILE, LOG_FILE = "port", "row.json", "child.log"
SWEEP_TRANSFORMERS_VARIABLE = "RECIPES_SWEEP_TRANSFORMERS"
VERIFY_STEP_COLUMNS = {"verify TP=1": "tp1_exact", "verify TP=2": "tp2_exact"}
TRACEBACK_FRAME = re.compile(r'File "([^"]+)", line (\d+), in (\S+)')
PYTHON_ERROR_LINE = re.compile(r"^(?:\[rank\d+\]:\s*)?((?:[A-Za-z_]\w*\.)*[A-Za-z_]\w*(?:Error|Exception)): (.+)$")


@dataclass
class SweepRow:
    architecture: str
    generated: bool = False
    tp1_exact: bool | None = None
    tp2_exact: bool | None = None
    seconds: float = 0.0
    reason: str = ""
    layer_types: list[str] = dataclasses.field(default_factory=list)  # the kinds the tiny model's layers ran


class StepFailed(Exception):
    """A step ran to the end but its result rules the architecture out; the message is the row's reason."""


# ---------------------------------------------------------------------------------------------------------
# Which architectures there are


def causal_lm_architectures() -> dict[str, str]:
    """model_type → the class AutoModelForCausalLM builds for it, in the installed transformers."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return dict(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


def select_architectures(only: list[str] | None) -> list[str]:
    known = causal_lm_architectures()
    if not only:
        return list(known)
    for name in only:
        if name not in known:
            close = difflib.get_close_matches(name, known, n=3, cutoff=0.6)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise ScaffoldError(
                f"--only {name}: not a model_type of transformers' causal-LM auto mapping "
                f"({len(known)} of them, e.g. llama, gpt_oss){hint}"
            )
    return list(dict.fromkeys(only))


# ---------------------------------------------------------------------------------------------------------
# One architecture, in the child process


def generate_port(model_type: str, out_dir: Path) -> str:
    """Generate the port of `model_type` under `out_dir`; returns its runner as "module:Class"."""
    from scaffold.pipeline import generate

    return generate(model_type, "transformers", out_dir).runner


def import_port(runner_path: str, model_type: str, out_dir: Path) -> type:
    """The port's runner class, checked to come from this sweep's port and to run the class HF builds."""
    module_name, _, class_name = runner_path.partition(":")
    importlib.invalidate_caches()  # the port's folder was written after this process started
    module = importlib.import_module(module_name)
    if out_dir not in Path(module.__file__).resolve().parents:
        raise StepFailed(f"{module_name} was imported from {module.__file__}, not from the sweep's port in "
                         f"{out_dir}; another generated_models package comes first on sys.path")
    runner_class = getattr(module, class_name)
    ported, expected = runner_class.model_class.__name__, causal_lm_architectures()[model_type]
    if ported != expected and not ports_text_tower(runner_class, model_type):
        raise StepFailed(f"the port is {ported} but AutoModelForCausalLM builds {expected} for {model_type}")
    return runner_class


def ports_text_tower(runner_class: type, model_type: str) -> bool:
    """The port is the text causal LM of the multimodal model HF builds (Gemma3ForCausalLM inside
    Gemma3ForConditionalGeneration): it runs that model's checkpoints, so it is proven against that model."""
    from transformers import AutoConfig

    composite = AutoConfig.for_model(model_type)
    text_config = composite.get_text_config(decoder=True)
    return text_config is not composite and text_config.model_type == runner_class.config_class.model_type


def build_checkpoint(model_type: str, out_dir: Path) -> Path:
    from scaffold.tiny import build_tiny_checkpoint

    return build_tiny_checkpoint(model_type, out_dir)


def exercised_layer_types(checkpoint: Path) -> list[str]:
    """The distinct layer types of the tiny checkpoint's config (its text config's, for a composite one)."""
    from transformers import AutoConfig

    layer_types = getattr(AutoConfig.from_pretrained(checkpoint).get_text_config(), "layer_types", None)
    return list(dict.fromkeys(map(str, layer_types))) if isinstance(layer_types, list) else []


def verify_at_tp1(runner_class: type, checkpoint: Path) -> None:
    from scaffold.verify import verify_port

    report = verify_port(runner_class, checkpoint)
    if not report.passed:
        raise StepFailed(describe_report(report))


def verify_at_tp2(runner_path: str, checkpoint: Path) -> None:
    from scaffold.verify import verify_port_distributed

    report = verify_port_distributed(runner_path, checkpoint, world_size=2)
    if not report.passed:
        raise StepFailed(describe_report(report))


def describe_report(report) -> str:
    """Why a VerifyReport did not pass, in one line."""
    problems = []
    if report.max_abs_logit_diff > report.tolerance:
        problems.append(f"max |port-HF| {report.max_abs_logit_diff:.1e} > {report.tolerance:.0e}")
    real_mismatches = len(report.mismatches) - len(report.near_ties)
    if real_mismatches:
        problems.append(f"{real_mismatches} greedy token mismatches")
    if report.recompiles_after_warmup:
        problems.append(f"{report.recompiles_after_warmup} recompiles after warm-up")
    return ", ".join(problems)


class ChildProgress:
    """The child's row as it stands, rewritten at every step so that the parent can tell where a child that
    crashed or timed out stopped."""

    def __init__(self, row: SweepRow, path: Path):
        self.row, self.path, self.step = row, path, "start"

    def enter(self, step: str) -> None:
        self.step = step
        self.save(finished=False)

    def save(self, finished: bool) -> None:
        record = {"step": self.step, "finished": finished, "row": dataclasses.asdict(self.row)}
        # Written aside and renamed: a child killed mid-write leaves the previous record, never half of one.
        partial = self.path.with_suffix(".partial")
        partial.write_text(json.dumps(record), encoding="utf-8")
        os.replace(partial, self.path)


def sweep_one(model_type: str, tp: int, workdir: Path) -> None:
    """Child process: run every step for one architecture and record the row in workdir/row.json."""
    out_dir = workdir / PORT_DIR
    row = SweepRow(model_type)
    progress = ChildProgress(row, workdir / ROW_FILE)
    try:
        check_same_transformers()
        progress.enter("generate")
        runner_path = generate_port(model_type, out_dir)
        row.generated = True
        progress.enter("import port")
        runner_class = import_port(runner_path, model_type, out_dir)
        progress.enter("checkpoint")
        checkpoint = build_checkpoint(model_type, workdir / "checkpoint")
        row.layer_types = exercised_layer_types(checkpoint)
        progress.enter("verify TP=1")
        verify_at_tp1(runner_class, checkpoint)
        row.tp1_exact = True
        if tp == 2:
            progress.enter("verify TP=2")
            verify_at_tp2(runner_path, checkpoint)
            row.tp2_exact = True
    except Exception as error:  # noqa: BLE001 - any failure is this architecture's result, not the sweep's
        fail_row(row, progress.step, _without_scratch_paths(describe_error(error, out_dir, model_type), workdir))
    progress.save(finished=True)


def check_same_transformers() -> None:
    """The child must sweep the release its parent reports (a PYTHONPATH that does not reach it would not)."""
    parent, child = os.environ.get(SWEEP_TRANSFORMERS_VARIABLE), importlib.metadata.version("transformers")
    if parent is not None and parent != child:
        raise StepFailed(f"this process imports transformers {child}, the sweep reports {parent}")


def fail_row(row: SweepRow, step: str, why: str) -> None:
    if step in VERIFY_STEP_COLUMNS:
        setattr(row, VERIFY_STEP_COLUMNS[step], False)
    row.reason = f"{step}: {why}"


def _without_scratch_paths(reason: str, workdir: Path) -> str:
    """Reasons name the tiny checkpoint and the port, not this run's scratch folder, so equal causes read equal."""
    return reason.replace(str(workdir / "checkpoint"), "<tiny checkpoint>").replace(str(workdir / PORT_DIR), "<port>")


# ---------------------------------------------------------------------------------------------------------
# One-line reasons


def describe_recipes_error(message: str, model_type: str) -> str:
    """Our own errors say what is wrong; the generator's refusal of a modeling file without exactly one
    *ForCausalLM class is reworded to name the class HF builds instead (GPT2LMHeadModel, ...)."""
    if "must define exactly one *ForCausalLM class" not in message:
        return message
    auto_class = causal_lm_architectures()[model_type]
    found = message.partition("(found: ")[2].partition(")")[0]
    return f"[no single *ForCausalLM class] HF's causal LM is {auto_class}; the modeling file has {found}"


# Where in a step an error came from, told by the function it passed through (first match wins): HF's side
# (building the tiny config or model, the reference run) or the port's (loading weights, decoding).
STAGES = {
    "tiny_config": "tiny config",
    "build_tiny_checkpoint": "HF model",
    "hf_reference": "HF reference",
    "init_model": "port load",
    "run_decode_loop": "port run",
}
HF_STAGES = {"tiny config", "HF model", "HF reference"}
OUT_OF_MEMORY = re.compile(r"can't allocate memory|not enough memory")


def describe_error(error: Exception, out_dir: Path, model_type: str) -> str:
    """One line naming what failed: the stage, then our own errors by their message, others by type and
    message, and where in our code (or the port's) it broke."""
    from core.errors import RecipesError

    if isinstance(error, StepFailed):
        return str(error)
    if isinstance(error, subprocess.TimeoutExpired):
        return f"torchrun timed out after {error.timeout:.0f} s"
    if str(error).startswith("torchrun verification failed"):
        return _torchrun_error(str(error), out_dir)
    frames = traceback.extract_tb(error.__traceback__)
    stage = _stage({frame.name for frame in frames})
    if isinstance(error, RecipesError):
        described = _first_line(describe_recipes_error(_first_line_untruncated(str(error)), model_type))
    else:
        described = f"{type(error).__name__}: {_first_line(str(error))}"
        location = _innermost(frames) if stage in HF_STAGES else _our_location(frames, out_dir)
        described += f" (at {location})" if location else ""
        if isinstance(error, MemoryError) or OUT_OF_MEMORY.search(str(error)):
            described = f"[over the {CHILD_MEMORY_LIMIT_BYTES / 2**30:.0f} GiB memory cap] {described}"
    return f"{stage}: {described}" if stage else described


def _stage(function_names: set[str]) -> str | None:
    return next((stage for function, stage in STAGES.items() if function in function_names), None)


def _our_location(frames: traceback.StackSummary, out_dir: Path) -> str | None:
    """The innermost frame in this repository's code or the generated port: where our own code broke."""
    ours = [REPO_ROOT / "core", REPO_ROOT / "scaffold", out_dir]
    for frame in reversed(frames):
        if any(root in Path(frame.filename).resolve().parents for root in ours):
            return _frame_location(frame)
    return None


def _innermost(frames: traceback.StackSummary) -> str | None:
    """Where HF's own code broke (its modeling or configuration file, usually)."""
    return _frame_location(frames[-1]) if frames else None


def _frame_location(frame: traceback.FrameSummary) -> str:
    return f"{Path(frame.filename).name}:{frame.lineno} in {frame.name}"


def _torchrun_error(message: str, out_dir: Path) -> str:
    """verify_port_distributed's error carries the tail of the ranks' stderr: the failing rank's exception, with
    the stage and the innermost frame of our code or the port's where the tail still shows them."""
    raised = [match for match in map(PYTHON_ERROR_LINE.match, message.splitlines())
              if match and "ChildFailedError" not in match.group(1)]
    if not raised:
        # A rank killed from outside (out of memory, a signal) leaves no Python exception behind.
        last_line = _first_line(message.strip().splitlines()[-1]) if message.strip() else "no output"
        return f"torchrun ranks failed without a Python error: {last_line}"
    # The first traceback in the tail is the rank's (torchrun's own comes last).
    rank_traceback = message[:message.index(raised[-1].group(0))]
    frames = [traceback.FrameSummary(filename, int(line), name, lookup_line=False)
              for filename, line, name in TRACEBACK_FRAME.findall(rank_traceback)]
    stage = _stage({frame.name for frame in frames})
    described = f"{raised[-1].group(1).split('.')[-1]}: {_first_line(raised[-1].group(2))}"
    location = _our_location(frames, out_dir)
    described += f" (at {location})" if location else ""
    return f"{stage}: {described}" if stage else described


def _first_line_untruncated(message: str) -> str:
    """The message's first line, joined with the next ones while it ends in ':' (HF's validation errors
    say what failed on the line after "Class validation error for validator '...':")."""
    lines = [line.strip() for line in message.strip().splitlines() if line.strip()]
    if not lines:
        return "(no message)"
    joined = lines.pop(0)
    while joined.endswith(":") and lines:
        joined += " " + lines.pop(0)
    return joined


def _first_line(message: str) -> str:
    line = _first_line_untruncated(message)
    return line if len(line) <= REASON_MAX_CHARS else line[:REASON_MAX_CHARS - 1] + "…"


# ---------------------------------------------------------------------------------------------------------
# The sweep, in the parent process


def run_child(model_type: str, tp: int, timeout_s: float, threads: int, scratch_root: Path) -> SweepRow:
    """Run `sweep_one` for `model_type` in a fresh process with its port first on PYTHONPATH."""
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix=f"{model_type}-", dir=scratch_root) as scratch:
        workdir = Path(scratch)
        # The child inherits PYTHONPATH, and so do its torchrun ranks: the port's folder shadows the
        # repository's generated_models; the repository root keeps core/ and scaffold/ importable.
        python_path = os.pathsep.join([str(workdir / PORT_DIR), str(REPO_ROOT), *_inherited_python_path()])
        # TMPDIR too: what the child and torchrun leave in temporary folders goes when the scratch folder does.
        env = {**os.environ, "PYTHONPATH": python_path, "OMP_NUM_THREADS": str(threads), "TMPDIR": str(workdir),
               SWEEP_TRANSFORMERS_VARIABLE: importlib.metadata.version("transformers")}
        command = [sys.executable, "-m", "scaffold.sweep", "--one", model_type, "--tp", str(tp),
                   "--workdir", str(workdir)]
        with open(workdir / LOG_FILE, "w") as log:
            # cwd is the scratch folder: with `-m`, the child's sys.path starts with its cwd, which must not
            # be the repository root (its generated_models would come first).
            child = subprocess.Popen(command, cwd=workdir, env=env, stdout=log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
            try:
                child.wait(timeout=timeout_s)
                failure = None if child.returncode == 0 else _exit_description(child.returncode, workdir / LOG_FILE)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):  # it may have ended since the timeout
                    os.killpg(child.pid, signal.SIGKILL)  # the child's own session: it and its torchrun ranks
                child.wait()
                failure = f"timed out after {timeout_s:.0f} s"
        row = _child_row(model_type, workdir / ROW_FILE, failure)
    row.seconds = round(time.perf_counter() - started, 1)
    return row


def _inherited_python_path() -> list[str]:
    """This process's PYTHONPATH entries made absolute: the child runs in its scratch folder, where a relative entry
    (`PYTHONPATH=build/transformers-X recipes-scaffold sweep`) would silently find nothing."""
    entries = os.environ.get("PYTHONPATH", "").split(os.pathsep)
    return [os.path.abspath(entry) for entry in entries if entry]


def _child_row(model_type: str, row_path: Path, failure: str | None) -> SweepRow:
    if not row_path.is_file():
        return SweepRow(model_type, reason=f"start: {failure or 'the child process recorded nothing'}")
    record = json.loads(row_path.read_text(encoding="utf-8"))
    row = SweepRow(**record["row"])
    if not record["finished"]:
        fail_row(row, record["step"], failure or "the child process stopped without a result")
    return row


def _exit_description(returncode: int, log_path: Path) -> str:
    if returncode < 0:
        name = signal.Signals(-returncode).name
        return f"killed by {name}" + (" (out of memory?)" if name == "SIGKILL" else "")
    log = log_path.read_text(errors="replace") if log_path.is_file() else ""
    raised = [match for match in map(PYTHON_ERROR_LINE.match, log.splitlines()) if match]
    if raised:
        return f"{raised[-1].group(1)}: {_first_line(raised[-1].group(2))}"
    return f"the child process exited {returncode}"


def sweep(architectures: list[str], tp: int, jobs: int, timeout_s: float) -> list[SweepRow]:
    """Rows in the order of `architectures`; progress lines on stderr as children start and finish. Every child
    works in its own folder under one scratch folder of this sweep, removed at the end."""
    threads = max(1, (os.cpu_count() or 1) // jobs)
    progress = SweepProgress(len(architectures))
    with tempfile.TemporaryDirectory(prefix="recipes-sweep-") as scratch:

        def run(model_type: str) -> SweepRow:
            position = progress.started(model_type)
            row = run_child(model_type, tp, timeout_s, threads, Path(scratch))
            progress.finished(position, row, tp)
            return row

        with ThreadPoolExecutor(jobs) as pool:
            return list(pool.map(run, architectures))


class SweepProgress:
    """"[12/189] llama ..." on stderr as each child starts, and its verdict when it ends (children overlap)."""

    def __init__(self, total: int):
        self.total, self.count, self.lock = total, 0, threading.Lock()

    def started(self, model_type: str) -> str:
        with self.lock:
            self.count += 1
            position = f"[{self.count}/{self.total}] {model_type}"
            print(f"{position} ...", file=sys.stderr, flush=True)
        return position

    def finished(self, position: str, row: SweepRow, tp: int) -> None:
        with self.lock:
            print(f"{position}: {_verdict(row, tp)} ({row.seconds:.1f} s)", file=sys.stderr, flush=True)


def _verdict(row: SweepRow, tp: int) -> str:
    exact = row.tp1_exact and (tp == 1 or row.tp2_exact)
    return f"exact at TP={'1 and 2' if tp == 2 else '1'}" if exact else row.reason


# ---------------------------------------------------------------------------------------------------------
# Output: table, summary, JSON, markdown

COLUMNS = ("architecture", "generated", "TP=1 exact", "TP=2 exact", "seconds", "layer types", "reason")


def _yes_no(value: bool | None) -> str:
    return "-" if value is None else "yes" if value else "no"


def table_cells(row: SweepRow) -> list[str]:
    return [row.architecture, _yes_no(row.generated), _yes_no(row.tp1_exact), _yes_no(row.tp2_exact),
            f"{row.seconds:.1f}", ",".join(row.layer_types) or "-", row.reason]


def text_table(rows: list[SweepRow]) -> str:
    cells = [list(COLUMNS)] + [table_cells(row) for row in rows]
    widths = [max(len(line[column]) for line in cells) for column in range(len(COLUMNS) - 1)]
    return "\n".join("  ".join([*(cell.ljust(width) for cell, width in zip(line, widths)), line[-1]]).rstrip()
                     for line in cells)


def markdown_table(rows: list[SweepRow]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for row in rows:
        lines.append("| " + " | ".join(_markdown_cell(cell) for cell in table_cells(row)) + " |")
    return "\n".join(lines)


def _markdown_cell(text: str) -> str:
    # A "|" would end the cell; "<tiny checkpoint>" would render as an (invisible) HTML tag.
    return text.replace("|", "\\|").replace("<", "&lt;")


def summary_line(rows: list[SweepRow], tp: int) -> str:
    tp1 = sum(bool(row.tp1_exact) for row in rows)
    tp2 = sum(bool(row.tp2_exact) for row in rows)
    not_run = " (not run: --tp 2 runs it)" if tp == 1 else ""
    return f"{tp1}/{len(rows)} exact at TP=1, {tp2}/{len(rows)} at TP=2{not_run}"


@dataclass(frozen=True)
class SweepRun:
    rows: list[SweepRow]
    tp: int
    date: str
    transformers_version: str
    command: str


def write_json(run: SweepRun, path: Path) -> None:
    document = {"transformers_version": run.transformers_version, "date": run.date, "tp": run.tp,
                "rows": [dataclasses.asdict(row) for row in run.rows]}
    path.write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")


def markdown_block(run: SweepRun) -> str:
    return "\n".join([
        f"Sweep of {run.date}, transformers {run.transformers_version}: `{run.command}`",
        "",
        f"**{summary_line(run.rows, run.tp)}**",
        "",
        markdown_table(run.rows),
    ])


def markdown_markers(transformers_version: str) -> tuple[str, str]:
    """The comments around a release's block: a README keeps one block per transformers release."""
    return (f"<!-- sweep transformers={transformers_version}:start -->",
            f"<!-- sweep transformers={transformers_version}:end -->")


def write_markdown(run: SweepRun, path: Path) -> None:
    """Replace only the text between this release's markers when the file has them (a block inside a README);
    otherwise add the block, markers included, at the file's end, so that the next run can replace it."""
    start_marker, end_marker = markdown_markers(run.transformers_version)
    block = markdown_block(run)
    existing = path.read_text(encoding="utf-8") if path.is_file() else ""
    start, end = existing.find(start_marker), existing.find(end_marker)
    if 0 <= start < end:
        text = f"{existing[:start + len(start_marker)]}\n{block}\n{existing[end:]}"
    else:
        separator = "\n" if existing and not existing.endswith("\n") else ""
        text = f"{existing}{separator}{start_marker}\n{block}\n{end_marker}\n"
    path.write_text(text, encoding="utf-8")


# ---------------------------------------------------------------------------------------------------------
# Command line


def _tp_size(value: str) -> int:
    # A ScaffoldError (not argparse's own error) so that a bad value is one `error:` line, exit status 2.
    if value not in ("1", "2"):
        raise ScaffoldError(f"--tp {value}: the sweep verifies at TP=1, or at TP=1 and TP=2 (give 1 or 2)")
    return int(value)


def _positive(option: str, kind: type):
    def parse(value: str):
        try:
            number = kind(value)
        except ValueError:
            number = 0
        if number <= 0:
            raise ScaffoldError(f"{option} {value}: give a positive {kind.__name__}")
        return number

    return parse


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="recipes-scaffold sweep",
        description="Generate, build a tiny checkpoint for and verify against HF eager every causal LM of the "
                    "installed transformers; one row per architecture with the reason when it is not exact.",
    )
    parser.add_argument("--tp", type=_tp_size, default=1,
                        help="1: verify at TP=1; 2: also at TP=2 under torchrun, where TP=1 is exact (default 1)")
    parser.add_argument("--only", action="append", metavar="NAME",
                        help="sweep only this model_type (repeatable), e.g. --only llama --only gpt2")
    parser.add_argument("--json", type=Path, metavar="FILE", help="write the rows as JSON")
    parser.add_argument("--markdown", type=Path, metavar="FILE",
                        help="write the table as markdown; a file with this transformers release's block "
                             "(between `<!-- sweep transformers=VERSION:start -->` and `...:end -->`) gets only "
                             "that block replaced, any other file gets the block added at its end")
    parser.add_argument("--jobs", type=_positive("--jobs", int), default=1,
                        help="architectures run at once (default 1)")
    parser.add_argument("--timeout", type=_positive("--timeout", float), default=DEFAULT_TIMEOUT_S,
                        metavar="S", help=f"seconds per architecture (default {DEFAULT_TIMEOUT_S})")
    # The child process's interface, not the user's.
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--workdir", type=Path, help=argparse.SUPPRESS)
    return parser


@exit_on_user_error
def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = _parser().parse_args(argv)
    if args.one:
        resource.setrlimit(resource.RLIMIT_AS, (CHILD_MEMORY_LIMIT_BYTES, CHILD_MEMORY_LIMIT_BYTES))
        sweep_one(args.one, args.tp, args.workdir.resolve())
        return 0
    architectures = select_architectures(args.only)
    for output in filter(None, (args.json, args.markdown)):
        if not output.parent.is_dir():
            raise ScaffoldError(f"cannot write {output}: no folder {output.parent}")
    started = time.perf_counter()
    rows = sweep(architectures, args.tp, args.jobs, args.timeout)
    run = SweepRun(rows, args.tp, datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                   importlib.metadata.version("transformers"), shlex.join(["recipes-scaffold", "sweep", *argv]))
    print(text_table(rows))
    print(summary_line(rows, args.tp))
    print(f"swept {len(rows)} architectures in {time.perf_counter() - started:.0f} s", file=sys.stderr)
    if args.json:
        write_json(run, args.json)
    if args.markdown:
        write_markdown(run, args.markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
