"""``python -m tests.ops.fake_serve [--fake-step-ms MS] serve ARGS...``: ``hooocus serve`` as shipped
(settings, tokens, history, logging, graceful shutdown) with the torch-free FakeRunner, so a test can
keep one job running and others queued for as long as it needs. Test-only entry point."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from engine.core.jobs import Engine
from engine.core.logging_setup import configure_logging
from engine.core.runtime import Runtime
from engine.core.settings import settings_from_args
from engine.core.store import ImageStore
from engine.core.testing import FakeRunner
from hooocus.cli import run_serve
from hooocus_ws import cli


def main(argv: Sequence[str] | None = None) -> int:
    own = argparse.ArgumentParser(add_help=False)
    own.add_argument("--fake-step-ms", type=float, default=50.0)
    fake, rest = own.parse_known_args(argv)
    parser = argparse.ArgumentParser(prog="fake_serve")
    cli.add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(rest)
    settings, _ = settings_from_args(args)
    configure_logging(settings.log_level)  # as hooocus.cli.main does for every command
    images = ImageStore()
    engine = Engine(FakeRunner(step_delay_s=fake.fake_step_ms / 1000.0), max_queue=settings.queue_size,
                    max_queued_per_owner=settings.max_queued_per_principal, image_sink=images.put)
    return run_serve(args, settings, runtime=Runtime(settings=settings, engine=engine, images=images))


if __name__ == "__main__":
    sys.exit(main())
