"""``pdserve simulate``: flags and handler (being built)."""

from __future__ import annotations

import argparse
from typing import Any


def add_parser(commands: Any) -> None:
    """Register ``simulate`` on the ``pdserve`` parser."""
    command = commands.add_parser("simulate", help="(being built)")
    command.set_defaults(handler=_run)


def _run(args: argparse.Namespace) -> int:
    raise SystemExit("pdserve simulate: not built yet")
