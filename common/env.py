"""The one module that reads environment variables.

Every entry point calls :func:`apply_offline_defaults` first so nothing is downloaded and
torch.distributed stays on loopback unless the operator says otherwise.
"""

from __future__ import annotations

import os
from pathlib import Path

_OFFLINE_DEFAULTS = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "GLOO_SOCKET_IFNAME": "lo",
    "TOKENIZERS_PARALLELISM": "false",
}


def offline_defaults() -> dict[str, str]:
    """The offline / loopback settings, for a child process's environment."""
    return dict(_OFFLINE_DEFAULTS)


def apply_offline_defaults() -> None:
    """Set offline / loopback defaults without overriding explicit settings."""
    for key, value in _OFFLINE_DEFAULTS.items():
        os.environ.setdefault(key, value)


def cache_dir() -> Path:
    """Where converted models live: ``$PDSERVE_CACHE_DIR`` or ``~/.cache/pdserve``."""
    configured = os.environ.get("PDSERVE_CACHE_DIR")
    return Path(configured) if configured else Path.home() / ".cache" / "pdserve"


def redis_url() -> str | None:
    return os.environ.get("PDSERVE_REDIS_URL")


def api_key() -> str | None:
    """The key ``pdserve chat`` / ``generate`` / ``bench`` send: ``$PDSERVE_API_KEY``."""
    return os.environ.get("PDSERVE_API_KEY") or None
