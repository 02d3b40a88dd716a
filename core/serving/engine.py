"""Continuous batching on a port's runner: up to `batch_size` sequences decode together; a new one is prefilled
into a free row (a step of its own) and joins the next decode step; a finished one frees its row at once.

Every row writes the same cache slot each decode step (one shared `cache_position`, so one compiled decode graph
serves every mix of rows), which works because each row's tokens are right-aligned at that slot: a prompt of P
tokens is prefilled into slots [slot - P, slot). Rows keep their own positions and their own mask row; an idle row
is fully masked. The cache holds twice the longest sequence; when the shared slot reaches its end, every row's
contents move back together (`compact`).

The scheduler (`Engine`) runs on rank 0 only; the tensor work (`RowBatch`) runs on every tensor-parallel rank:
rank 0 broadcasts each operation before it runs it, the other ranks replay it (`serve_replica`).
"""

from __future__ import annotations

import collections
import logging
import threading
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.distributed as dist

from core.kv_cache import StaticKVCache
from core.model_runner import ModelRunner
from core.sampling import Sampler, SamplingParams, seen_tokens

INCOMPLETE_CHARACTER = "\ufffd"
logger = logging.getLogger(__name__)


@dataclass
class Event:
    """What a sequence produced in one step: new text (held back while it may still become a stop string or
    an incomplete character) and, at its end, why it finished ("stop" or "length")."""

    text: str
    token_ids: list[int]
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0


@dataclass
class Sequence:
    """One request's generation. `emit` is called from the engine thread; `cancel()` may come from any thread."""

    id: str
    prompt_ids: list[int]
    max_tokens: int
    sampling: SamplingParams
    emit: Callable[[Event], None]
    stop_ids: frozenset[int] = frozenset()
    ignore_eos: bool = False
    output_ids: list[int] = field(default_factory=list)
    sent_text: str = ""
    finish_reason: str | None = None
    cancelled: bool = False
    sampler: Sampler | None = None
    seen: torch.Tensor | None = None

    def cancel(self) -> None:
        self.cancelled = True


def _held_back(text: str, stop_strings: tuple[str, ...]) -> int:
    """How many characters at the end of `text` could still begin a stop string (or complete a character)."""
    held = len(text) - len(text.rstrip(INCOMPLETE_CHARACTER))
    for stop in stop_strings:
        for size in range(min(len(stop) - 1, len(text)), 0, -1):
            if text.endswith(stop[:size]):
                held = max(held, size)
                break
    return held


class RowBatch:
    """The batch's tensors and the forward steps on them, identical on every rank."""

    def __init__(self, runner: ModelRunner):
        self.runner = runner
        rows = runner.batch_size
        self.span = runner.input_max_len + runner.max_new_tokens
        self.length = 2 * self.span
        device = runner.device
        self.cache = StaticKVCache.for_model(runner.model.config, self.length, device, batch_size=rows)
        self.mask = torch.zeros(rows, self.length, dtype=torch.long, device=device)
        self.positions = torch.zeros(rows, 1, dtype=torch.long, device=device)
        self.slot = runner.input_max_len
        self.first_slot = [self.slot] * rows

    def apply(self, operation: tuple) -> torch.Tensor | None:
        kind, *arguments = operation
        return getattr(self, kind)(*arguments)

    def prefill(self, row: int, prompt_ids: list[int]) -> torch.Tensor:
        """Prefill row `row` with a prompt right-aligned at the shared slot; the last position's logits [1, vocab]."""
        runner, device = self.runner, self.runner.device
        start = self.slot - len(prompt_ids)
        row_mask = torch.zeros(1, self.length, dtype=torch.long, device=device)
        row_mask[0, start : self.slot] = 1
        inputs = {"input_ids": torch.tensor([prompt_ids], device=device), "attention_mask": row_mask,
                  "position_ids": torch.arange(len(prompt_ids), device=device)[None],
                  "cache_position": torch.arange(start, self.slot, device=device), "kv_cache": self.cache.row(row)}
        # Eager, also in graph modes: a compiled prefill would specialise on the row; decode is the hot loop.
        logits = runner.model(**runner.model_input_prepare(inputs)).logits[:, -1, :]
        self.mask[row] = row_mask[0]
        self.positions[row] = len(prompt_ids)
        self.first_slot[row] = start
        return logits

    def decode(self, tokens: list[int], active: list[int]) -> torch.Tensor:
        """One token for every active row at the shared slot; idle rows are masked out. Logits [rows, vocab]."""
        runner = self.runner
        idle = [row for row in range(len(tokens)) if row not in active]
        if idle:
            self.mask[idle] = 0
        self.mask[active, self.slot] = 1
        inputs = {"input_ids": torch.tensor(tokens, device=runner.device)[:, None], "attention_mask": self.mask,
                  "position_ids": self.positions.clone(),
                  "cache_position": torch.tensor([self.slot], device=runner.device), "kv_cache": self.cache}
        _, logits = runner.model_step(inputs)
        self.positions[active] += 1
        self.slot += 1
        return logits

    def compact(self, keep: int) -> None:
        """Move every row back so that the shared slot becomes `keep` (>= every active row's length)."""
        shift = self.slot - keep
        self.cache.shift_slots(shift)
        self.mask.copy_(torch.roll(self.mask, -shift, dims=1))
        self.first_slot = [slot - shift for slot in self.first_slot]
        self.slot = keep

    def stop(self) -> None:
        pass


def _broadcast(operation: tuple | None) -> tuple:
    box = [operation]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def serve_replica(runner: ModelRunner) -> None:
    """A tensor-parallel rank other than 0: replay rank 0's operations until it says stop."""
    batch = RowBatch(runner)
    while True:
        operation = _broadcast(None)
        batch.apply(operation)
        if operation[0] == "stop":
            return


class Engine:
    """Rank 0's scheduler: admits waiting sequences into free rows, decodes, samples, emits, frees."""

    def __init__(self, runner: ModelRunner, max_waiting: int = 64):
        self.runner = runner
        self.batch = RowBatch(runner)
        self.rows: list[Sequence | None] = [None] * runner.batch_size
        self.next_tokens = [runner.tokenizer.pad_token_id] * runner.batch_size
        self.waiting: collections.deque[Sequence] = collections.deque()
        self.max_waiting = max_waiting
        self.lock = threading.Lock()
        self.work = threading.Event()
        self.distributed = runner.world_size > 1
        self.eos_ids = frozenset(runner.eos_token_ids())

    # ------------------------------------------------------------------ any thread
    def submit(self, sequence: Sequence) -> bool:
        """Queue a sequence; False when the free rows and `max_waiting` queue places are all taken (the caller
        answers 429)."""
        with self.lock:
            if len(self.waiting) >= self.max_waiting + self.free_rows():
                return False
            self.waiting.append(sequence)
        self.work.set()
        return True

    def busy(self) -> bool:
        return bool(self.waiting) or any(self.rows)

    def free_rows(self) -> int:
        return sum(sequence is None for sequence in self.rows)

    # ------------------------------------------------------------------ engine thread
    def run(self, stopping: threading.Event) -> None:
        """Step until `stopping` is set and nothing is waiting or running; then release the replicas. A step
        that fails ends every sequence in it with finish_reason "error" (their clients get a 500) and the
        engine goes on."""
        while not (stopping.is_set() and not self.busy()):
            try:
                worked = self.step()
            except Exception as error:  # any failure of a step is reported to its clients
                logger.exception("engine step failed")
                self._fail_running(f"{type(error).__name__}: {error}")
                worked = True
            if not worked:
                self.work.wait(timeout=0.05)
                self.work.clear()
        if self.distributed:
            self._apply(("stop",))

    def _fail_running(self, message: str) -> None:
        for row, sequence in enumerate(self.rows):
            if sequence is not None:
                sequence.finish_reason = "error"
                sequence.emit(Event(message, [], "error", len(sequence.prompt_ids), len(sequence.output_ids)))
                self.rows[row] = None

    def step(self) -> bool:
        """Admit, then decode once; False when there was nothing to do."""
        self._release_cancelled()
        if self.batch.slot >= self.batch.length:
            self._compact()
        admitted = self._admit()
        active = [row for row, sequence in enumerate(self.rows) if sequence is not None]
        if not active:
            return admitted
        logits = self._apply(("decode", list(self.next_tokens), active))
        for row in active:
            self._advance(row, logits[row : row + 1])
        return True

    def _apply(self, operation: tuple):
        if self.distributed:
            _broadcast(operation)
        with torch.inference_mode():
            return self.batch.apply(operation)

    def _admit(self) -> bool:
        admitted = False
        while True:
            row = next((row for row, sequence in enumerate(self.rows) if sequence is None), None)
            with self.lock:
                if row is None or not self.waiting:
                    return admitted
                sequence = self.waiting.popleft()
            if sequence.cancelled:
                continue
            self.rows[row] = sequence
            logits = self._apply(("prefill", row, sequence.prompt_ids))
            admitted = True
            self._advance(row, logits)

    def _advance(self, row: int, logits: torch.Tensor) -> None:
        """Choose the row's next token, emit its text, free the row if the sequence finished."""
        sequence = self.rows[row]
        if sequence.sampler is None:
            sequence.sampler = Sampler(sequence.sampling, self.runner.device,
                                       self.runner.runner_settings["model_config"]["seed"])
            if sequence.sampling.repetition_penalty != 1.0:
                prompt = torch.tensor([sequence.prompt_ids], device=logits.device)
                sequence.seen = seen_tokens(prompt, torch.ones_like(prompt), logits.shape[-1])
        token = int(sequence.sampler(logits, sequence.seen)[0])
        if sequence.seen is not None:
            sequence.seen[0, token] = True
        sequence.output_ids.append(token)
        self.next_tokens[row] = token
        self._emit(sequence)
        if sequence.finish_reason is not None or sequence.cancelled:
            self.rows[row] = None

    def _emit(self, sequence: Sequence) -> None:
        token = sequence.output_ids[-1]
        stops = sequence.sampling.stop_strings
        if not sequence.ignore_eos and (token in self.eos_ids or token in sequence.stop_ids):
            sequence.finish_reason = "stop"
        text = self.runner.tokenizer.decode(sequence.output_ids, skip_special_tokens=True)
        # OpenAI's rule: the text ends before the stop string. Earlier text never held one whole.
        start = max(len(sequence.sent_text) - max(map(len, stops), default=0) + 1, 0)
        found = [index for stop in stops if (index := text.find(stop, start)) >= 0]
        if found:
            text, sequence.finish_reason = text[: min(found)], "stop"
        elif sequence.finish_reason is None and len(sequence.output_ids) >= sequence.max_tokens:
            sequence.finish_reason = "length"
        visible = text if sequence.finish_reason else text[: len(text) - _held_back(text, stops)]
        delta = visible[len(sequence.sent_text):] if visible.startswith(sequence.sent_text) else ""
        sequence.sent_text += delta
        if delta or sequence.finish_reason:
            sequence.emit(Event(delta, [token], sequence.finish_reason, len(sequence.prompt_ids),
                                len(sequence.output_ids)))

    def _release_cancelled(self) -> None:
        for row, sequence in enumerate(self.rows):
            if sequence is not None and sequence.cancelled:
                self.rows[row] = None

    def _compact(self) -> None:
        active = [row for row, sequence in enumerate(self.rows) if sequence is not None]
        longest = max((self.batch.slot - self.batch.first_slot[row] for row in active), default=0)
        self._apply(("compact", max(longest, self.runner.input_max_len)))
