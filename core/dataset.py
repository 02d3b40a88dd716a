"""Prompt sets for `data_config.dataset`: `default` (built-in prompts) or a `.jsonl` / `.json` file of records
`{"id": ..., "prompt": "..."}` or `{"id": ..., "messages": [{"role": ..., "content": ...}, ...]}`.

Every record is checked before anything runs; a bad one stops the run naming the file and line (the record's
index in a `.json` list).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from core.errors import SettingsError

DEFAULT_DATASET = "default"


@dataclass(frozen=True)
class Record:
    id: str
    prompt: str | list[dict[str, str]]


def default_records(model_name: str, count: int) -> list[Record]:
    """`count` built-in prompts, cycling through three."""
    prompts = [f"Explain what {model_name} is.", "Write a haiku about the sea.", "The three primary colours are"]
    return [Record(str(index), prompts[index % len(prompts)]) for index in range(count)]


def _record(raw, where: str) -> Record:
    if not isinstance(raw, dict):
        raise SettingsError(f"{where}: a record must be a JSON object with \"id\" and \"prompt\" or \"messages\"")
    unknown = sorted(set(raw) - {"id", "prompt", "messages"})
    if unknown:
        raise SettingsError(f"{where}: unknown field '{unknown[0]}' (a record has \"id\" and \"prompt\" or "
                            f"\"messages\")")
    if not isinstance(raw.get("id"), (str, int)) or isinstance(raw.get("id"), bool):
        raise SettingsError(f"{where}: \"id\" must be a string or an integer, got {raw.get('id')!r}")
    if ("prompt" in raw) == ("messages" in raw):
        raise SettingsError(f"{where}: a record needs exactly one of \"prompt\" (a text) and \"messages\" (a chat)")
    if "prompt" in raw:
        if not isinstance(raw["prompt"], str) or not raw["prompt"]:
            raise SettingsError(f"{where}: \"prompt\" must be a non-empty string")
        return Record(str(raw["id"]), raw["prompt"])
    messages = raw["messages"]
    if not isinstance(messages, list) or not messages or not all(
        isinstance(message, dict) and set(message) == {"role", "content"}
        and all(isinstance(value, str) for value in message.values())
        for message in messages
    ):
        raise SettingsError(f"{where}: \"messages\" must be a non-empty list of {{\"role\": str, \"content\": str}}")
    return Record(str(raw["id"]), [dict(message) for message in messages])


def load_records(path: str | Path) -> list[Record]:
    """The records of a `.jsonl` (one per line; blank lines skipped) or `.json` (a list) file, all checked,
    ids unique."""
    path = Path(path)
    if path.suffix not in (".jsonl", ".json"):
        raise SettingsError(f"data_config.dataset {path}: expected 'default' or a .jsonl / .json file of records")
    if not path.is_file():
        raise SettingsError(f"data_config.dataset {path} does not exist")
    text = path.read_text(encoding="utf-8")
    entries: list[tuple[str, object]] = []
    if path.suffix == ".jsonl":
        for number, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                try:
                    entries.append((f"{path} line {number}", json.loads(line)))
                except json.JSONDecodeError as error:
                    raise SettingsError(f"{path} line {number}: not valid JSON ({error.msg})") from None
    else:
        try:
            items = json.loads(text)
        except json.JSONDecodeError as error:
            raise SettingsError(f"{path} line {error.lineno}: not valid JSON ({error.msg})") from None
        if not isinstance(items, list):
            raise SettingsError(f"{path}: a .json dataset must be a list of records")
        entries = [(f"{path} record {index}", item) for index, item in enumerate(items)]
    records, first_seen = [], {}
    for where, raw in entries:
        record = _record(raw, where)
        if record.id in first_seen:
            raise SettingsError(f"{where}: id {record.id!r} repeats {first_seen[record.id]}")
        first_seen[record.id] = where
        records.append(record)
    if not records:
        raise SettingsError(f"{path} holds no records")
    return records
