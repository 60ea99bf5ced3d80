"""`python -m engine.prepare_model`: convert the default model once (used by make)."""

from __future__ import annotations

import time

from common import env


def main() -> None:
    env.apply_offline_defaults()
    from engine.model_loader import ensure_default_model

    started = time.perf_counter()
    path = ensure_default_model()
    print(f"default model ready at {path} ({time.perf_counter() - started:.1f} s)")


if __name__ == "__main__":
    main()
