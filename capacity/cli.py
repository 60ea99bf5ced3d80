"""Register ``pdserve profile``, ``pdserve simulate`` and ``pdserve plan``.

Each command's flags and handler live in its own module; this file only attaches them to
the ``pdserve`` parser (deploy/cli.py).
"""

from __future__ import annotations

from typing import Any


def add_parsers(commands: Any) -> None:
    """Attach the three capacity commands to the ``pdserve`` subparsers."""
    from capacity import plan_cli, profile_cli, simulate_cli

    profile_cli.add_parser(commands)
    simulate_cli.add_parser(commands)
    plan_cli.add_parser(commands)
