"""Records run through a runner in batches of `batch_size`, each finished batch appended to a JSONL file.

Batches are cut from the record list in order, so a record always shares its batch (and its padding) with the
same neighbours: a run that was stopped and is started again skips the ids already written, redoes only
what is missing, and its outputs equal those of an uninterrupted run. Each batch's lines go out in one write,
flushed to disk; a line cut short by a kill is dropped when the file is read back.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Callable

from tqdm import tqdm

from core.dataset import Record
from core.errors import SettingsError
from core.model_runner import GenerationResult, ModelRunner
from core.streaming import TerminalStream

logger = logging.getLogger(__name__)


def written_ids(output: Path, repair: bool = True) -> set[str]:
    """Ids already in `output`; with `repair`, a last line left incomplete by a killed run is cut off the file."""
    if not output.exists():
        return set()
    data = output.read_bytes()
    complete = data[: data.rfind(b"\n") + 1]
    if len(complete) != len(data) and repair:
        logger.warning("%s: dropping an incomplete last line (a run was stopped while writing it)", output)
        with open(output, "r+b") as file:
            file.truncate(len(complete))
    ids = set()
    for number, line in enumerate(complete.decode("utf-8").splitlines(), start=1):
        try:
            ids.add(str(json.loads(line)["id"]))
        except (json.JSONDecodeError, KeyError, TypeError):
            raise SettingsError(f"{output} line {number} is not a record this command wrote (JSON with an \"id\"); "
                                f"choose another --output-jsonl") from None
    return ids


def _output_line(record: Record, output: str, token_ids: list[int]) -> str:
    prompt_key = "messages" if isinstance(record.prompt, list) else "prompt"
    line = {"id": record.id, prompt_key: record.prompt, "output": output, "output_token_ids": token_ids}
    return json.dumps(line, ensure_ascii=False) + "\n"


def _append(output: Path, lines: list[str]) -> None:
    with open(output, "a", encoding="utf-8") as file:
        file.write("".join(lines))
        file.flush()
        os.fsync(file.fileno())


def run_records(
    runner: ModelRunner,
    records: list[Record],
    batch_size: int,
    output_jsonl: Path | None = None,
    write_output: bool = True,
    warm_up: bool = False,
    stream: bool = False,
    show_progress: bool = False,
    on_batch: Callable[[list[Record], GenerationResult], None] | None = None,
) -> list[GenerationResult]:
    """Generate for every record not already in `output_jsonl`; returns the batches' results.

    write_output: false on tensor-parallel ranks other than 0: they skip the same records, rank 0 writes.
    warm_up: the first batch generates twice (graph modes compile during the first).
    on_batch(records, result) is called after each batch (rank 0 prints there).
    """
    done = set()
    if output_jsonl is not None:
        if write_output:
            output_jsonl.parent.mkdir(parents=True, exist_ok=True)
        done = written_ids(output_jsonl, repair=write_output)
    batches = [records[start:start + batch_size] for start in range(0, len(records), batch_size)]
    remaining = sum(record.id not in done for record in records)
    progress = tqdm(total=len(records), initial=len(records) - remaining, unit="prompt", disable=not show_progress,
                    desc="generating", dynamic_ncols=True)
    results, tokens, started = [], 0, time.perf_counter()
    with progress:
        for batch in batches:
            todo = [record for record in batch if record.id not in done]
            if not todo:
                continue
            options = {"warm_up": True} if warm_up and not results else {"warm_up": False}
            streamer = TerminalStream(runner.tokenizer, [record.id for record in batch]) if stream else None
            if streamer is not None:
                options["stream"] = streamer
            result = runner.model_generate([record.prompt for record in batch], **options)
            if streamer is not None:
                streamer.close(result.output_token_ids)
            results.append(result)
            if output_jsonl is not None and write_output:
                _append(output_jsonl, [_output_line(record, text, ids) for record, text, ids
                                       in zip(batch, result.outputs, result.output_token_ids)
                                       if record.id not in done])
            if on_batch is not None:
                on_batch(batch, result)
            tokens += sum(len(ids) for ids in result.output_token_ids)
            progress.set_postfix_str(f"{tokens / (time.perf_counter() - started):.1f} tokens/s", refresh=False)
            progress.update(len(todo))
    return results
