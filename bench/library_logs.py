"""Library logs off the benchmarks' terminal: the scripts print their own progress and results."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
import transformers


def libraries_log_to(path: Path) -> None:
    """Library logs (transformers' loading bars and warnings, torch's and inductor's, Python warnings) go to `path`,
    not the terminal."""
    handler = logging.FileHandler(path, mode="w")
    logging.basicConfig(level=logging.INFO, handlers=[handler], force=True)
    transformers.logging.disable_default_handler()
    transformers.logging.add_handler(handler)
    transformers.logging.disable_progress_bar()
    torch._logging.set_logs(all=logging.WARNING)
    logging.captureWarnings(True)
