"""The ``pdserve`` command line.

``pdserve up`` starts the serving cluster (local Ray on 127.0.0.1 + a private Redis, or an
existing cluster with ``--address``) and serves until Ctrl-C; ``pdserve status`` shows its
pools and workers; ``pdserve check`` validates a Serve config offline (Serve's schema and
pdserve's own checks); ``pdserve chat`` / ``pdserve generate`` stream a reply from a
running router (``--local``: run the engine in this process instead, offline);
``pdserve bench`` is the end-to-end load generator (the ``loadgen`` package);
``pdserve profile`` / ``simulate`` / ``plan`` are the capacity planner (``capacity``). The logic
lives in the deploy, router and loadgen packages; this file only parses arguments.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from common import env

DEFAULT_PORT = 50051


def main(argv: list[str] | None = None) -> int:
    env.apply_offline_defaults()
    args = _parser().parse_args(argv)
    return int(args.handler(args) or 0)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pdserve", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(required=True, metavar="COMMAND")

    up = commands.add_parser("up", help="start the serving cluster; Ctrl-C stops it")
    up.add_argument("--config", type=Path, default=None, help="Serve config (deploy/serve.yaml)")
    up.add_argument("--address", help="existing Ray cluster (e.g. auto); default: local Ray")
    up.add_argument("--redis-url", help="registry Redis; default: a private redis-server")
    up.add_argument("--port", type=int, default=None, help="router gRPC port (default 50051)")
    up.add_argument(
        "--http-port", type=int, default=None, help="router HTTP (OpenAI API) port (default 8000)"
    )
    up.add_argument("--api-key-file", help="API keys, one per line, required on both ports")
    up.add_argument("--num-cpus", type=int, default=None, help="local Ray's CPUs")
    up.add_argument(
        "--cluster-secret-file", help="cluster secret, same path on every node (default: new)"
    )
    up.add_argument("--redis-password-file", help="registry Redis password, one line")
    up.set_defaults(handler=_up)

    status = commands.add_parser("status", help="pools, replicas and worker load")
    status.add_argument("--address", help="Ray cluster; default: `pdserve up`'s, else auto")
    status.add_argument("--redis-url", default=None, help="registry Redis (default: the app's)")
    status.add_argument("--app", default=None, help="Serve application name (default pdserve)")
    status.add_argument("--redis-password-file", help="registry Redis password (default: app's)")
    status.set_defaults(handler=_status)

    check = commands.add_parser("check", help="validate a Serve config offline")
    check.add_argument("--config", type=Path, default=None, help="default: deploy/serve.yaml")
    check.set_defaults(handler=_check)

    for name, chat in (("chat", True), ("generate", False)):
        kind = "a chat reply" if chat else "a completion"
        command = commands.add_parser(name, help=f"stream {kind} from a running router")
        command.add_argument("prompt")
        command.add_argument(
            "--address", default=f"127.0.0.1:{DEFAULT_PORT}", help="router gRPC address"
        )
        command.add_argument("--model", default="", help="pool/model name (default pool)")
        command.add_argument("--max-tokens", type=int, default=128)
        command.add_argument("--temperature", type=float, default=0.0)
        command.add_argument("--top-p", type=float, default=0.0)
        command.add_argument("--top-k", type=int, default=0)
        command.add_argument("--seed", type=int, default=None)
        command.add_argument("--stop", action="append", default=[], help="stop string")
        command.add_argument("--system", default=None, help="system message (chat)")
        command.add_argument(
            "--logprobs",
            type=int,
            default=None,
            metavar="K",
            help="print each token's log-prob and K alternatives (0..20) to stderr",
        )
        command.add_argument("--timeout", type=float, default=None, help="deadline, seconds")
        command.add_argument("--api-key", default=None, help="API key (default $PDSERVE_API_KEY)")
        command.add_argument("--tls-ca-file", default=None, help="TLS router: the CA to trust")
        command.add_argument(
            "--local", action="store_true", help="no router: run the engine in this process"
        )
        command.set_defaults(handler=_stream, chat=chat)

    from loadgen.cli import add_parser as add_bench_parser

    add_bench_parser(commands)
    from capacity.cli import add_parsers as add_capacity_parsers

    add_capacity_parsers(commands)
    return parser


def _up(args: argparse.Namespace) -> int:
    from deploy.serve_config import DEFAULT_CONFIG
    from deploy.up import UpOptions, run

    options = UpOptions(
        config=args.config or DEFAULT_CONFIG,
        address=args.address,
        redis_url=args.redis_url,
        port=args.port,
        http_port=args.http_port,
        api_key_file=args.api_key_file,
        num_cpus=args.num_cpus,
        cluster_secret_file=args.cluster_secret_file,
        redis_password_file=args.redis_password_file,
    )
    return run(options)


def _status(args: argparse.Namespace) -> int:
    from deploy.status import run

    return run(
        address=args.address,
        redis_url=args.redis_url,
        app=args.app,
        redis_password_file=args.redis_password_file,
    )


def _check(args: argparse.Namespace) -> int:
    from deploy.serve_config import DEFAULT_CONFIG, ServeConfig

    path = args.config or DEFAULT_CONFIG
    try:
        config = ServeConfig.load(path)
    except (OSError, ValueError) as exc:
        print(f"{path}: {exc}", file=sys.stderr)
        return 1
    print(f"{path}: ok\n{config.describe()}")
    return 0


def _stream(args: argparse.Namespace) -> int:
    if args.local:
        return _generate_locally(args)
    from common import env
    from router import client

    return client.run(
        args.address,
        args.prompt,
        chat=args.chat,
        timeout_s=args.timeout,
        api_key=args.api_key or env.api_key(),
        tls_ca_file=args.tls_ca_file,
        model=args.model,
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed,
        stop=args.stop,
        system=args.system,
        logprobs=args.logprobs,
    )


def _generate_locally(args: argparse.Namespace) -> int:
    from engine import LLM, SamplingParams

    llm = LLM(model=args.model or None)
    params = SamplingParams(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p or 1.0,
        top_k=args.top_k,
        seed=args.seed,
        logprobs=args.logprobs,
    )
    if args.chat:
        messages = [{"role": "system", "content": args.system}] if args.system else []
        output = llm.chat([*messages, {"role": "user", "content": args.prompt}], params)[0]
    else:
        output = llm.generate(args.prompt, params)[0]
    print(output.text)
    if output.logprobs:
        from router.client import describe_logprobs

        print(describe_logprobs(output.logprobs), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
