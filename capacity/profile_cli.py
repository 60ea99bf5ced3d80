"""``pdserve profile``: flags and handler (being built)."""

from __future__ import annotations

import argparse
from typing import Any


def add_parser(commands: Any) -> None:
    """Register ``profile`` on the ``pdserve`` parser."""
    command = commands.add_parser("profile", help="(being built)")
    command.set_defaults(handler=_run)


def _run(args: argparse.Namespace) -> int:
    raise SystemExit("pdserve profile: not built yet")
