"""The command line every port's serve.py runs: an OpenAI-compatible HTTP server with continuous batching.

Rank 0 serves HTTP and schedules; under torchrun the other ranks replay its steps and never open a socket.
SIGTERM (or Ctrl-C) stops accepting connections, lets the requests in flight finish, then exits.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import signal
import threading

import uvicorn

from core.cli import exit_on_user_error
from core.model_runner import ModelRunner, compiled_graphs
from core.serving.engine import Engine, Sequence, serve_replica
from core.serving.openai_api import create_app
from core.settings import load_runner_settings

logger = logging.getLogger(__name__)


class GracefulServer(uvicorn.Server):
    """uvicorn's server, but a SIGTERM or SIGINT ends it like a normal return (exit status 0) once the requests in
    flight are answered, instead of re-raising the signal after shutdown."""

    @contextlib.contextmanager
    def capture_signals(self):
        previous = {number: signal.signal(number, self.handle_exit) for number in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for number, handler in previous.items():
                signal.signal(number, handler)


def parse_args(argv: list[str] | None, description: str | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", required=True, help="runner_settings YAML file (batch_size: rows decoded together)")
    parser.add_argument("--model-path", help="checkpoint folder; overrides model_path in the YAML")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on every endpoint but /health")
    parser.add_argument("--max-waiting", type=int, default=64,
                        help="requests queued beyond the running batch; past that the server answers 429")
    parser.add_argument("--served-model-name", help="the model id clients send (default: the port's name)")
    return parser.parse_args(argv)


def warm_up(engine: Engine) -> None:
    """Graph modes compile the decode graph (one for every mix of rows) before the first client arrives."""
    runner = engine.runner
    finished = threading.Event()
    sequence = Sequence("warm-up", [runner.tokenizer.pad_token_id] * 4, 3, runner.sampling,
                        emit=lambda event: event.finish_reason and finished.set())
    engine.submit(sequence)
    while not finished.is_set():
        engine.step()


@exit_on_user_error
def main(runner_class: type[ModelRunner], argv: list[str] | None = None, *, model_name: str,
         description: str | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = parse_args(argv, description)
    overrides = {"model_path": args.model_path} if args.model_path else {}
    runner = runner_class(load_runner_settings(args.config, overrides))
    if runner.global_rank != 0:
        logging.getLogger().setLevel(logging.WARNING)
    runner.init_model()
    if runner.global_rank != 0:
        # torchrun passes a SIGTERM or Ctrl-C on to every rank; rank 0 finishes what runs, then tells the
        # others to stop, so they must not stop first.
        for number in (signal.SIGINT, signal.SIGTERM):
            signal.signal(number, signal.SIG_IGN)
        serve_replica(runner)
        return
    engine = Engine(runner, max_waiting=args.max_waiting)
    if runner.exe_mode != "eager":
        warm_up(engine)
        logger.info("warmed up: %d graphs compiled", compiled_graphs())
    stopping = threading.Event()
    worker = threading.Thread(target=engine.run, args=(stopping,), name="engine", daemon=True)
    worker.start()
    app = create_app(engine, runner, args.served_model_name or model_name, args.api_key)
    server = GracefulServer(uvicorn.Config(app, host=args.host, port=args.port, log_level="warning",
                                           timeout_graceful_shutdown=None))
    logger.info("serving %s on http://%s:%d/v1 (batch of %d rows)", model_name, args.host, args.port,
                runner.batch_size)
    try:
        server.run()
    finally:
        stopping.set()
        engine.work.set()
        worker.join()
        logger.info("stopped")
