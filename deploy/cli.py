"""The ``pdserve`` command line.

Today: ``pdserve generate`` runs the engine in this process (offline, on the default model
unless ``--model`` names a local checkpoint). ``pdserve up`` will start the Ray cluster once
the serving layers land; until then it says so and exits non-zero.
"""

from __future__ import annotations

import argparse
import sys

from common import env


def main(argv: list[str] | None = None) -> int:
    env.apply_offline_defaults()
    args = _parser().parse_args(argv)
    return int(args.handler(args) or 0)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pdserve", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(required=True, metavar="COMMAND")

    up = commands.add_parser("up", help="start the local serving cluster")
    up.set_defaults(handler=_up)

    generate = commands.add_parser("generate", help="generate text in-process (offline)")
    generate.add_argument("prompt")
    generate.add_argument("--model", default=None, help="local HF checkpoint directory")
    generate.add_argument("--max-tokens", type=int, default=64)
    generate.add_argument("--temperature", type=float, default=0.0)
    generate.add_argument("--chat", action="store_true", help="apply the chat template")
    generate.set_defaults(handler=_generate)
    return parser


def _up(args: argparse.Namespace) -> int:
    print(
        "pdserve up: no cluster yet — the Ray deployment is not built in this version.\n"
        "Try the engine offline: pdserve generate 'The capital of France is'",
        file=sys.stderr,
    )
    return 1


def _generate(args: argparse.Namespace) -> int:
    from engine import LLM, SamplingParams

    llm = LLM(model=args.model)
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature)
    if args.chat:
        output = llm.chat([{"role": "user", "content": args.prompt}], params)[0]
    else:
        output = llm.generate(args.prompt, params)[0]
    print(output.text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
