"""``pdserve up``: start (or join) a Ray cluster, deploy serve.yaml, serve until a signal.

Lifecycle of :class:`Up`::

    start   config     serve.yaml checked (deploy.serve_config), --redis-url / --port applied
            model      local runs: the default model converted into the cache directory if
                       it is not yet (staged progress on stderr; engine.model_loader)
            redis      a private redis-server on 127.0.0.1 with a generated password
                       (local runs without --redis-url)
            secret     --cluster-secret-file, the args' one, or a generated one (mode 0600
                       in the cache directory, removed on stop): handed to router and
                       workers as ``args.cluster_secret_file`` (the path, never the key)
            ray        local: a new Ray node on 127.0.0.1, no dashboard (deploy.local_ray);
                       --address: connect to that cluster
            serve      Serve's controller with the file's proxy options, then the file's
                       applications — the same call `serve run serve.yaml` makes
            ready      the app RUNNING (every replica constructed: workers registered and
                       SERVING), the router's gRPC health SERVING → one line on stdout:
                       "serving gRPC on HOST:PORT", then (unless the router's
                       http_port is null) "serving HTTP on HOST:PORT"
    stop    (SIGINT / SIGTERM)  the app is deleted — every replica drains — then, if we
            started them, Serve, Ray and Redis stop. A second signal skips the drain.

A small state file (``$PDSERVE_CACHE_DIR/pdserve-up.json``) tells ``pdserve status`` where
the running cluster is.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any, TextIO

from common import env
from common.cluster_secret import ClusterSecret
from common.grpc_server import wait_healthy
from common.ready_line import format_up_http_ready, format_up_ready
from common.redis_client import redact_url
from common.redis_process import RedisProcess
from deploy.app_config import WORKER_SHUTDOWN_TIMEOUT_S
from deploy.local_ray import connect, init_local, pin_to_loopback
from deploy.serve_config import DEFAULT_CONFIG, ServeConfig


@dataclass(frozen=True)
class UpOptions:
    config: Path = DEFAULT_CONFIG
    address: str | None = None  # None: start a local Ray node on 127.0.0.1
    redis_url: str | None = None  # None: private redis-server (local), else args / env
    port: int | None = None  # the router's gRPC port (None: the config's)
    http_port: int | None = None  # the router's HTTP port (None: the config's, 8000)
    api_key_file: str | None = None  # API keys on both public ports (None: the config's)
    cluster_secret_file: str | None = None  # None: the args' one, else a generated one
    redis_password_file: str | None = None  # None: the args' one (or the URL's password)
    num_cpus: int | None = None  # local Ray's CPUs (None: this machine's)
    ready_timeout_s: float = 600.0


def state_file() -> Path:
    return env.cache_dir() / "pdserve-up.json"


class Up:
    def __init__(self, options: UpOptions, err: TextIO = sys.stderr) -> None:
        self.options = options
        self.err = err
        self.endpoint: str | None = None
        self.http_endpoint: str | None = None  # the OpenAI-compatible HTTP API, if served
        self._redis: RedisProcess | None = None
        self._owns_ray = False
        self._app: str | None = None
        self._generated: list[Path] = []  # secret files we wrote: removed on teardown
        self._overrides: dict[str, Any] = {}  # what start() resolved: redis_url, router port

    def start(self) -> str:
        """Everything up and healthy; returns the router's gRPC endpoint."""
        opts = self.options
        if opts.address is None:
            pin_to_loopback()  # before anything imports ray (the config check does)
        config = ServeConfig.load(opts.config)
        if opts.address is None and _uses_default_model(config):
            # Before Ray: convert once here, with progress on our stderr, rather than in
            # the replicas (whose output only Ray's logs see).
            from engine.model_loader import ensure_default_model

            ensure_default_model(err=self.err)
        redis_url = opts.redis_url or config.args.redis_url
        password_file = opts.redis_password_file or config.args.redis_password_file
        if opts.address is None and redis_url is None:
            self._redis = RedisProcess().start()
            # The URL without its password goes into the app config (Serve shows it); the
            # password reaches the replicas as a file, like the cluster secret.
            password = self._redis.password
            assert password is not None  # RedisProcess always sets one
            path = self._secret_path("redis.password")
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(password + "\n")
            redis_url, password_file = self._redis.url_without_password, str(path)
        redis_url = redis_url or env.redis_url()
        if redis_url is None:
            raise ValueError("on an existing cluster, give --redis-url (or $PDSERVE_REDIS_URL)")
        self._overrides = {
            "redis_url": redis_url,
            "router_port": opts.port,
            "router_http_port": opts.http_port,
            # Replicas run elsewhere: an absolute path (read there, never sent as keys).
            "router_api_key_file": opts.api_key_file and str(Path(opts.api_key_file).resolve()),
            "cluster_secret_file": self._cluster_secret(config),
            "redis_password_file": password_file,
        }
        config = config.with_args(config.args.with_overrides(**self._overrides))
        self._app = config.app_name

        if opts.address is None:
            # Logical CPUs: at least what the app's smallest shape needs, so a 1-core box
            # oversubscribes instead of waiting forever for a CPU that never comes.
            gcs = init_local(opts.num_cpus or max(os.cpu_count() or 1, config.min_cpus()))
            self._owns_ray = True
        else:
            gcs = connect(opts.address)
        self._say(f"ray {gcs} · redis {redact_url(redis_url)} · app {self._app}")

        _deploy(config)
        tls = config.args.router_config(redis_url="redis://validation-only").tls_cert_file
        self.endpoint = self._wait_ready(config.app_name, opts.ready_timeout_s, tls is None)
        _write_state({"pid": os.getpid(), "ray_address": gcs, "redis_url": redis_url,
                      "grpc": self.endpoint, "app": self._app})  # fmt: skip
        return self.endpoint

    def apply(self, config: ServeConfig) -> None:
        """Redeploy: the same Redis and router port, ``config``'s everything else.

        Serve works out what changed: ``args`` restart the whole app, a worker
        deployment's ``user_config`` is applied live to that deployment (a new worker per
        replica, the old one drained), deployment options roll the affected replicas.
        Returns once Serve has the new config; the rollout continues in the background.
        """
        _deploy(config.with_args(config.args.with_overrides(**self._overrides)))

    def stop(self) -> None:
        """Undo start(), in reverse; safe after a partial start."""
        try:
            self.drain()
        finally:
            self.teardown()

    def drain(self) -> None:
        """Delete the app: every replica stops taking work and finishes its streams."""
        import ray
        from ray import serve

        if not ray.is_initialized():
            return
        if self._app is not None:
            self._say("draining: deleting the app (replicas finish their streams)")
            _delete_app(serve, self._app, WORKER_SHUTDOWN_TIMEOUT_S + 30.0)
            self._app = None
        if self._owns_ray:
            serve.shutdown()

    def teardown(self) -> None:
        """Stop what start() started (Ray, Redis) without waiting for anything to drain."""
        import ray

        _remove_state()
        if ray.is_initialized():
            ray.shutdown()
        if self._redis is not None:
            self._redis.stop()
            self._redis = None
        for path in self._generated:
            path.unlink(missing_ok=True)
        self._generated = []
        self._say("stopped")

    def _cluster_secret(self, config: ServeConfig) -> str:
        """The secret file router and workers get; a fresh one unless one was given."""
        given = self.options.cluster_secret_file or config.args.cluster_secret_file
        if given:
            ClusterSecret.from_file(given)  # fail here, not in every replica
            return given
        return str(ClusterSecret.generate().write(self._secret_path("cluster.secret")))

    def _secret_path(self, name: str) -> Path:
        """A fresh path for an owner-only file of ours, removed again on teardown."""
        path = env.cache_dir() / "secrets" / f"{os.getpid()}-{name}"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.unlink(missing_ok=True)  # O_CREAT below then applies mode 0600
        self._generated.append(path)
        return path

    def _wait_ready(self, app: str, timeout_s: float, probe: bool = True) -> str:
        from ray import serve

        deadline = time.monotonic() + timeout_s
        said: set[str] = set()
        while True:
            status = serve.status().applications.get(app)
            state = status.status.value if status is not None else "NOT_STARTED"
            if state == "RUNNING":
                break
            if state in ("DEPLOY_FAILED", "UNHEALTHY"):
                raise RuntimeError(f"app {app} {state}: {status.message if status else ''}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"app {app} not RUNNING after {timeout_s}s ({state})")
            # Serve explains slow starts (e.g. replicas waiting for CPUs / GPUs): pass it on.
            for name, d in (status.deployments if status is not None else {}).items():
                if d.message and d.message not in said:
                    said.add(d.message)
                    self._say(f"{name}: {d.message}")
            time.sleep(0.5)
        handle = serve.get_app_handle(app)
        endpoint = handle.address.remote().result(timeout_s=60)
        self.http_endpoint = handle.http_address.remote().result(timeout_s=60)
        if probe:  # over TLS the replica's own health check stands (RouterHost)
            wait_healthy(endpoint, timeout_s=30)
        return str(endpoint)

    def _say(self, line: str) -> None:
        print(f"pdserve up: {line}", file=self.err, flush=True)


def run(options: UpOptions, out: TextIO = sys.stdout, err: TextIO = sys.stderr) -> int:
    """The command: start, print the endpoint, wait for SIGINT / SIGTERM, stop."""
    up = Up(options, err)
    signals = _Signals()
    code = 0
    signals.install()
    try:
        endpoint = up.start()
        signals.install()  # again: ray.init replaced the SIGTERM handler with sys.exit
        print(format_up_ready(endpoint), file=out, flush=True)
        if up.http_endpoint is not None:
            print(format_up_http_ready(up.http_endpoint), file=out, flush=True)
        while True:
            time.sleep(1.0)
    except _Interrupted:
        pass
    except Exception as exc:
        print(f"pdserve up: {exc}", file=err, flush=True)
        code = 1
    finally:
        try:
            up.drain()
        except _Interrupted:  # a second signal: skip the drain
            print("pdserve up: interrupted again: skipping the drain", file=err, flush=True)
        except Exception as exc:  # Ray and Redis must still stop
            print(f"pdserve up: drain failed: {exc!r}", file=err, flush=True)
        signals.disarm()
        up.teardown()
    return code


class _Interrupted(Exception):
    pass


class _Signals:
    """While armed, SIGINT / SIGTERM raise :class:`_Interrupted` in the main thread."""

    def __init__(self) -> None:
        self.armed = False

    def install(self) -> None:
        self.armed = True
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._handle)

    def disarm(self) -> None:
        self.armed = False

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if self.armed:
            raise _Interrupted(name)
        print(f"pdserve up: {name} ignored while Ray and Redis stop", file=sys.stderr)


def _uses_default_model(config: ServeConfig) -> bool:
    """Whether the router or a worker of ``config`` runs the default (converted) model."""
    args, check = config.args, "redis://validation-only"
    if any(pool.model_path is None for pool in args.router_config(redis_url=check).pools):
        return True
    return any(
        args.worker_config(
            role, config.worker_section(role), worker_id="check", redis_url=check
        ).engine.model
        is None
        for role in args.workers
    )


def _deploy(config: ServeConfig) -> None:
    # The same two calls `serve run serve.yaml` makes (ray.serve.scripts.run).
    from ray.serve._private.api import serve_start
    from ray.serve.config import gRPCOptions

    schema = config.schema()
    client = serve_start(
        http_options=schema.http_options.model_dump(),
        proxy_location=schema.proxy_location,
        grpc_options=gRPCOptions(**schema.grpc_options.model_dump()),
        controller_options=schema.controller_options,
    )
    client.deploy_apps(schema, _blocking=False)


def _write_state(state: dict[str, Any]) -> None:
    path = state_file()
    path.parent.mkdir(parents=True, exist_ok=True)
    # Owner-only: the Redis URL in it may carry the registry's password.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)  # also when the file existed with a wider mode
    with os.fdopen(fd, "w") as f:
        f.write(json.dumps(state, indent=2) + "\n")


def _remove_state() -> None:
    path = state_file()
    try:
        if json.loads(path.read_text()).get("pid") == os.getpid():
            path.unlink()
    except (OSError, ValueError):
        pass


def read_state() -> dict[str, Any] | None:
    """The running `pdserve up`'s addresses, or None if there is none."""
    try:
        state = json.loads(state_file().read_text())
        os.kill(int(state["pid"]), 0)  # a stale file of a `pdserve up` that was killed
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return state if isinstance(state, dict) else None


def _delete_app(serve: Any, app: str, timeout_s: float) -> None:
    """Delete ``app`` and wait until Serve reports it gone.

    ``serve.delete(_blocking=True)`` gives up after a fixed 60 s, while Serve itself waits
    up to each replica's ``graceful_shutdown_timeout_s`` (a worker's drain) before killing
    it; so the wait is repeated (deleting again is a no-op) until ``timeout_s``.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            serve.delete(app, _blocking=True)
            return
        except TimeoutError:
            if time.monotonic() >= deadline:
                raise
