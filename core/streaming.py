"""`--stream`: generations printed while they are generated.

One row: its text as it grows, token by token (a character that its next token completes is held back until
then). Several rows: each row's whole text as soon as that row finishes, tagged with its record id.
"""

from __future__ import annotations

import sys
from typing import Callable, TextIO

INCOMPLETE_CHARACTER = "\ufffd"  # what decoding shows for a multi-byte character cut between tokens


class TerminalStream:
    def __init__(self, tokenizer, ids: list[str], out: TextIO | None = None):
        self.tokenizer, self.ids, self.out = tokenizer, ids, out or sys.stdout
        self.printed_text = ""
        self.printed_rows: set[int] = set()

    def __call__(self, rows: list[list[int]], finished: list[bool]) -> None:
        if len(rows) == 1:
            text = self.tokenizer.decode(rows[0], skip_special_tokens=True)
            stable = text if finished[0] else text.rstrip(INCOMPLETE_CHARACTER)
            if stable.startswith(self.printed_text) and len(stable) > len(self.printed_text):
                self._write(("" if self.printed_text else f"[{self.ids[0]}] ") + stable[len(self.printed_text):])
                self.printed_text = stable
            return
        for row, done in enumerate(finished):
            if done and row not in self.printed_rows:
                self._print_row(row, rows[row])

    def close(self, output_token_ids: list[list[int]]) -> None:
        """After the batch: the rows that ran to max_new_tokens (never finished), and a newline for one row."""
        if len(output_token_ids) == 1:
            text = self.tokenizer.decode(output_token_ids[0], skip_special_tokens=True)
            prefix = "" if self.printed_text else f"[{self.ids[0]}] "
            self._write(prefix + text[len(self.printed_text):] + "\n")
            self.printed_text = ""
            return
        for row, tokens in enumerate(output_token_ids):
            if row not in self.printed_rows:
                self._print_row(row, tokens)
        self.printed_rows.clear()

    def _print_row(self, row: int, tokens: list[int]) -> None:
        self.printed_rows.add(row)
        self._write(f"[{self.ids[row]}] {self.tokenizer.decode(tokens, skip_special_tokens=True)!r}\n")

    def _write(self, text: str) -> None:
        self.out.write(text)
        self.out.flush()


StreamCallback = Callable[[list[list[int]], list[bool]], None]
