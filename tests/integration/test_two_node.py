"""A real two-node Ray cluster on one machine: KV over a veth, then the worker node dies.

Node A (namespace A, 198.18.0.1): Redis, the Ray head, `pdserve up --address` (the Serve
app's driver), the Router and the DecodeWorker. Node B (namespace B, 198.18.0.2): a Ray
worker node with the PrefillWorker. Placement is explicit: the nodes carry the custom Ray
resources ``node_a`` / ``node_b`` and each deployment asks for one of them. Each node's
``GLOO_SOCKET_IFNAME`` is its veth; pdserve's servers bind the node IP Ray reports
(``host: auto``). The client runs inside namespace A (:mod:`tests.integration.two_node_client`).

1. Greedy requests through the router equal the single-process engine (fp32 on both
   sides); each was prefilled remotely, on node B. The KV crossed the veth: the prefill
   worker's connection goes to the decode worker's KV rendezvous address on node A, the
   decode worker holds connections from 198.18.0.2, and A's veth received at least the
   prompts' KV bytes.
2. Listeners: pdserve's servers (router gRPC + HTTP, workers' gRPC, KV and metrics) and
   Redis listen on their node's 198.18 address or 127.0.0.1 only. Ray 2.60 itself binds
   its GCS, raylet, agents, metrics and core-worker gRPC servers to the wildcard when the
   node IP is not loopback (upstream ray#59852 moves them to the node IP); those ports are
   pinned here (private to the namespace) and are the only wildcard listeners allowed.
3. Node B is killed (every process in its namespace) while long prompts are being
   prefilled there. What the code supports: the decode worker's ``on_prefill_failure:
   local`` — the remote prefill (or the transfer) fails fast, since B's sockets close, and
   the decode worker prefills locally — so each in-flight stream completes with the same
   greedy output, or fails with a clear UNAVAILABLE; every call ends within its deadline.
4. Once B's registration expires (heartbeat TTL) the router sees a decode-only pool and
   the head keeps serving: new requests are prefilled locally on node A, same output.

If namespaces cannot be made (not root) the test fails and says so: it is part of the
suite, and CI runs as root.
"""

from __future__ import annotations

import json
import logging
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from common.cluster_secret import ClusterSecret
from common.launch import ChildProcess, child_env, wait_until
from common.ready_line import parse_up_ready
from engine import LLM, SamplingParams
from tests.integration.deploy_helpers import (
    deployment,
    load_default,
    long_prompt,
    small_workers,
    write_config,
)
from tests.integration.netns import Host, Listener, TwoHosts

log = logging.getLogger(__name__)
pytestmark = [pytest.mark.slow, pytest.mark.timeout(420)]

BIN = Path(sys.executable).parent
REDIS_PORT = 6380
# Ray's ports, fixed (each namespace has its own port space, so they cannot collide).
RAY_PORTS = {
    "--node-manager-port": 6700,
    "--object-manager-port": 6701,
    "--dashboard-agent-grpc-port": 6702,
    "--dashboard-agent-listen-port": 6703,
    "--metrics-export-port": 6704,
    "--runtime-env-agent-port": 6705,
    "--min-worker-port": 10002,
    "--max-worker-port": 10199,
}
GCS_PORT = 6379
RAY_CLIENT_PORT = 10001
# Ray 2.60's fixed metrics ports: the autoscaler monitor's and the dashboard head's
# (ray_constants.AUTOSCALER_METRIC_PORT, dashboard consts DASHBOARD_METRIC_PORT).
RAY_FIXED_METRICS = {44217, 44227}
RAY_WILDCARD_PORTS = (
    {GCS_PORT, RAY_CLIENT_PORT, *RAY_FIXED_METRICS}
    | {v for k, v in RAY_PORTS.items() if not k.endswith("worker-port")}
    | set(range(RAY_PORTS["--min-worker-port"], RAY_PORTS["--max-worker-port"] + 1))
)
LOCAL = "127.0.0.1"
BLOCK = 16
KV_BYTES_PER_TOKEN = 2 * 30 * 3 * 64 * 4  # SmolLM2-135M, fp32: 45 KiB


@dataclass
class Cluster:
    hosts: TwoHosts
    workdir: Path
    router: str  # the router's gRPC endpoint (on node A)
    redis_url: str
    password_file: Path
    env_a: dict[str, str]
    up: ChildProcess

    def client(self, *args: str, timeout_s: float = 60) -> list[dict[str, Any]]:
        """Run the client inside namespace A; its JSON lines."""
        argv = [sys.executable, "-m", "tests.integration.two_node_client", *args]
        done = subprocess.run(
            self.hosts.a.command(argv),
            capture_output=True,
            text=True,
            env=self.env_a,
            timeout=timeout_s,
            check=False,
        )
        assert done.returncode == 0, done.stderr[-3000:]
        return [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]

    def client_process(self, name: str, *args: str) -> ChildProcess:
        argv = [sys.executable, "-m", "tests.integration.two_node_client", *args]
        return ChildProcess(self.hosts.a.command(argv), self.workdir / f"{name}.err", self.env_a)

    def workers(self) -> dict[str, dict[str, Any]]:
        (reply,) = self.client("registry", self.redis_url, str(self.password_file))
        return {w["role"]: w for w in reply["workers"]}

    def generate(self, name: str, requests: list[dict[str, Any]]) -> list[dict[str, Any]]:
        path = self.workdir / f"{name}.json"
        path.write_text(json.dumps(requests))
        return _final(self.client("generate", self.router, str(path), timeout_s=150))


# ---- fixtures --------------------------------------------------------------------------


@pytest.fixture
def hosts() -> Iterator[TwoHosts]:
    try:
        made = TwoHosts.create()
    except RuntimeError as exc:
        pytest.fail(str(exc), pytrace=False)
    try:
        yield made
    finally:
        made.delete()
    assert not made.exists(), "the namespaces outlived the test"


@pytest.fixture
def cluster(hosts: TwoHosts) -> Iterator[Cluster]:
    # Short: Ray's socket paths under its temp dir must fit in sun_path (108 bytes).
    workdir = Path(tempfile.mkdtemp(prefix="pdn-", dir="/tmp"))
    started = time.monotonic()
    up: ChildProcess | None = None
    try:
        env_a, env_b = _node_env(hosts.a, workdir), _node_env(hosts.b, workdir)
        password_file = _start_redis(hosts.a, workdir, env_a)
        head = ["--head", "--port", str(GCS_PORT), "--include-dashboard", "false"]
        _ray_start(
            hosts.a, env_a, workdir / "ray-a", [*head, "--resources", '{"node_a": 1}']
        ).check()
        # Node B joins while the app deploys: the PrefillWorker waits for its resource.
        join = ["--address", f"{hosts.a.ip}:{GCS_PORT}", "--resources", '{"node_b": 1}']
        node_b = _ray_start(hosts.b, env_b, workdir / "ray-b", join)
        config = write_config(_two_node_config(), workdir / "serve.yaml")
        secret = ClusterSecret.generate().write(workdir / "cluster.secret")
        redis_url = f"redis://{hosts.a.ip}:{REDIS_PORT}/0"
        up = ChildProcess(
            hosts.a.command([str(BIN / "pdserve"), "up", "--config", str(config),
                "--address", f"{hosts.a.ip}:{GCS_PORT}", "--redis-url", redis_url,
                "--redis-password-file", str(password_file), "--cluster-secret-file",
                str(secret), "--port", "0", "--http-port", "0"]),
            workdir / "up.err",
            # Its state file goes to the work dir, not the user's cache (a real `pdserve
            # up` of someone else's may be running on this machine).
            {**env_a, "PDSERVE_CACHE_DIR": str(workdir / "cache")},
        )  # fmt: skip
        node_b.check()
        try:
            router = up.wait_for_line(parse_up_ready, timeout_s=240)
        except (RuntimeError, TimeoutError) as exc:
            pytest.fail(f"pdserve up did not come up on the two nodes: {exc}")
        log.info("two-node cluster up in %.1fs", time.monotonic() - started)
        yield Cluster(hosts, workdir, router, redis_url, password_file, env_a, up)
    finally:
        # No drain: after node B died Serve keeps a PrefillWorker pending, and deleting
        # the app would wait on it. Everything of the cluster runs in the two namespaces.
        if up is not None:
            up.kill()
        hosts.delete()
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture(scope="module")
def llm() -> LLM:
    return LLM(dtype="float32", num_kv_blocks=256, num_threads=1)


# ---- the test ----------------------------------------------------------------------------


def test_two_nodes_kv_over_veth_then_worker_node_dies(cluster: Cluster, llm: LLM) -> None:
    a, b = cluster.hosts.a, cluster.hosts.b
    greedy = SamplingParams(max_tokens=8, temperature=0.0)
    workers = cluster.workers()
    prefill, decode = workers["prefill"], workers["decode"]
    assert _host_of(prefill["grpc_address"]) == b.ip, prefill
    assert _host_of(decode["grpc_address"]) == a.ip and _host_of(decode["kv_address"]) == a.ip
    assert _host_of(cluster.router) == a.ip

    # 1. Greedy through the router == the single-process engine; prefilled on node B.
    prompts = [llm.engine.encode(long_prompt(seed, words=20)) for seed in range(3)]
    expected = [o.token_ids for o in llm.generate(prompts, greedy)]
    rx_before = a.rx_bytes()
    results = cluster.generate("remote", _requests(prompts, 8))
    for result, want in zip(results, expected, strict=True):
        assert result["event"] == "done", result
        assert result["token_ids"] == want
        assert result["route"]["prefill_mode"] == "remote", result["route"]
        assert result["route"]["prefill_worker"] == prefill["worker_id"]
        assert result["route"]["decode_worker"] == decode["worker_id"]
    _assert_kv_crossed_veth(cluster, prompts, prefill, decode, rx_before)

    # 2. Nothing of ours listens beyond its node's address; Ray's wildcards are pinned.
    ours = {
        a: {_address(cluster.router), _address(decode["grpc_address"]),
            _address(decode["kv_address"]), (a.ip, REDIS_PORT)},
        b: {_address(prefill["grpc_address"])},
    }  # fmt: skip
    for host in (a, b):
        listening = host.listeners()
        _check_listeners(host, listening)
        bound = {(entry.host, entry.port) for entry in listening}
        assert ours[host] <= bound, (ours[host] - bound, listening)

    # 3. Node B dies while long prompts are being prefilled there.
    long_prompts = [llm.engine.encode(long_prompt(100 + seed, words=120)) for seed in range(3)]
    long_expected = [o.token_ids for o in llm.generate(long_prompts, greedy)]
    outcomes, took = _kill_node_b_during(cluster, _requests(long_prompts, 8, timeout_s=120))
    assert len(outcomes) == len(long_prompts), outcomes
    assert took < 130, f"in-flight streams took {took:.0f}s to end after node B died"
    for outcome, want in zip(outcomes, long_expected, strict=True):
        if outcome["event"] == "error":  # allowed: a clear status, never a hang
            assert outcome["code"] == "UNAVAILABLE" and outcome["details"], outcome
        else:
            assert outcome["token_ids"] == want, outcome
            assert outcome["route"]["decode_worker"] == decode["worker_id"]
    assert any(o["event"] == "done" for o in outcomes), outcomes
    # The kill hit them in flight: the decode worker prefilled them itself (or they ended).
    hit = [o for o in outcomes if o["event"] == "error" or o["route"]["prefill_mode"] == "local"]
    assert hit, f"node B died after every prefill had finished: {outcomes}"

    log.info("streams ended %.1fs after the kill: %s", took, _summary(outcomes))
    # 4. B's registration expires; the head keeps serving, prefilling on node A.
    wait_until(lambda: "prefill" not in cluster.workers(), 30, "node B's worker to expire")
    for result, want in zip(
        cluster.generate("local", _requests(prompts, 8)), expected, strict=True
    ):
        assert result["event"] == "done", result
        assert result["token_ids"] == want
        assert result["route"]["prefill_mode"] == "local", result["route"]
        assert result["route"]["prefill_worker"] == ""
    assert cluster.up.alive(), cluster.up.log_tail()


# ---- helpers -----------------------------------------------------------------------------


def _assert_kv_crossed_veth(
    cluster: Cluster,
    prompts: list[list[int]],
    prefill: dict[str, Any],
    decode: dict[str, Any],
    rx_before: int,
) -> None:
    """The prompts' KV went from the prefill worker on B to the decode worker's
    rendezvous (the transfer's peer address) and its gloo pair on A, over the veth."""
    a, b = cluster.hosts.a, cluster.hosts.b
    kv_bytes = sum(len(p) // BLOCK * BLOCK for p in prompts) * KV_BYTES_PER_TOKEN
    assert a.rx_bytes() - rx_before >= kv_bytes, "A's veth saw less than the prompts' KV"
    prefill_pid = _pid_listening(b, prefill["grpc_address"])
    decode_pid = _pid_listening(a, decode["kv_address"])
    to_decode = [c for c in b.connections() if c.pid == prefill_pid]
    assert _address(decode["kv_address"]) in {c.peer for c in to_decode}, to_decode
    from_b = [c for c in a.connections() if c.pid == decode_pid and c.peer[0] == b.ip]
    assert from_b, f"no connection from {b.ip} to the decode worker: {a.connections()}"
    assert _environ(prefill_pid).get("GLOO_SOCKET_IFNAME") == b.ifname
    assert _environ(decode_pid).get("GLOO_SOCKET_IFNAME") == a.ifname
    log.info("KV crossed the veth: %d bytes of it at least", kv_bytes)


def _kill_node_b_during(
    cluster: Cluster, requests: list[dict[str, Any]]
) -> tuple[list[dict[str, Any]], float]:
    """Send ``requests`` at once, kill node B half a second later; each request's final
    record and how long after the kill the last one ended."""
    path = cluster.workdir / "failover.json"
    path.write_text(json.dumps(requests))
    with cluster.client_process("failover", "generate", cluster.router, str(path)) as client:
        sent = 0
        while sent < len(requests):
            line = client.next_line(timeout_s=60)
            assert line is not None, client.log_tail()
            sent += json.loads(line).get("event") == "sent"
        time.sleep(0.5)  # the prompts are on node B now (queued or being prefilled)
        killed_at = time.monotonic()
        cluster.hosts.b.kill_all()
        log.info("node B killed")
        assert not cluster.hosts.b.pids(), "node B still has processes"
        records = []
        while (line := client.next_line(timeout_s=150)) is not None:
            record = json.loads(line)
            if record.get("event") == "end":
                break
            records.append(record)
        return _final(records), time.monotonic() - killed_at


def _node_env(host: Host, workdir: Path) -> dict[str, str]:
    """The environment of everything started on ``host``: Ray's children inherit it."""
    token = workdir / "ray-token"
    if not token.exists():
        token.write_text(secrets.token_hex(32))  # this cluster's own Ray auth token
        token.chmod(0o600)
    env = child_env(threads=1)
    # Set by pin_to_loopback() if another test of this session started local Ray here: it
    # would make Ray treat a node IP as 127.0.0.1.
    for key in ("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "RAY_ADDRESS"):
        env.pop(key, None)
    env.update(
        GLOO_SOCKET_IFNAME=host.ifname,
        RAY_AUTH_MODE="token",
        RAY_AUTH_TOKEN_PATH=str(token),
        RAY_USAGE_STATS_ENABLED="0",
    )
    return env


def _start_redis(host: Host, workdir: Path, env: dict[str, str]) -> Path:
    password = secrets.token_hex(16)
    password_file = workdir / "redis.password"
    password_file.write_text(password + "\n")
    conf = workdir / "redis.conf"
    conf.write_text(
        f"bind {host.ip} {LOCAL}\nport {REDIS_PORT}\nrequirepass {password}\n"
        'save ""\nappendonly no\n'
    )
    for path in (password_file, conf):
        path.chmod(0o600)
    redis = ChildProcess(host.command(["redis-server", str(conf)]), workdir / "redis.err", env)
    ping = host.command(["redis-cli", "-p", str(REDIS_PORT), "--no-auth-warning", "-a",
                         password, "ping"])  # fmt: skip

    def up() -> bool:
        return subprocess.run(ping, capture_output=True, text=True).stdout.strip() == "PONG"

    redis.wait_for(up, timeout_s=20, what="redis-server answering PING")
    return password_file


class _RayStart:
    """``ray start`` on one host, running; :meth:`check` waits for it and asserts success."""

    def __init__(self, host: Host, argv: list[str], env: dict[str, str], log_path: Path) -> None:
        self.host = host
        self.log_path = log_path
        self._log = log_path.open("w")
        self.proc = subprocess.Popen(
            host.command(argv), stdout=self._log, stderr=subprocess.STDOUT, env=env
        )

    def check(self, timeout_s: float = 120) -> None:
        try:
            code = self.proc.wait(timeout=timeout_s)
        finally:
            self._log.close()
        tail = self.log_path.read_text(errors="replace")[-3000:]
        assert code == 0, f"ray start on {self.host.netns} failed ({code}):\n{tail}"


def _ray_start(host: Host, env: dict[str, str], temp_dir: Path, args: list[str]) -> _RayStart:
    argv = [str(BIN / "ray"), "start", "--node-ip-address", host.ip, "--temp-dir",
            str(temp_dir), "--num-cpus", "1", "--disable-usage-stats", *args]  # fmt: skip
    for flag, port in RAY_PORTS.items():
        argv += [flag, str(port)]
    return _RayStart(host, argv, env, temp_dir.with_suffix(".log"))


def _two_node_config() -> dict[str, Any]:
    """serve.yaml, small, fp32, one replica each; Router + decode on A, prefill on B."""
    data = load_default()
    small_workers(data)
    for name, node in (
        ("Router", "node_a"),
        ("DecodeWorker", "node_a"),
        ("PrefillWorker", "node_b"),
    ):
        entry = deployment(data, name)
        options = entry.setdefault("ray_actor_options", {})
        options["resources"] = {node: 0.1}
        if "placement_group_bundles" in entry:
            entry["placement_group_bundles"] = [{"CPU": options["num_cpus"], node: 0.1}]
        entry.pop("autoscaling_config", None)
        entry["num_replicas"] = 1
        if name != "Router":
            worker = entry["user_config"]
            worker["engine"]["dtype"] = "float32"  # bit-equal with the reference engine
            # A dead prefill node must fail fast, not after small_workers' slow-box 180 s.
            worker["prefill_timeout_s"] = 60
            worker["kv_transfer"] = {"timeout_s": 60}
    return data


def _requests(prompts: list[list[int]], max_tokens: int, timeout_s: float = 90) -> list[dict]:
    return [{"token_ids": p, "max_tokens": max_tokens, "timeout_s": timeout_s} for p in prompts]


def _final(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each request's done / error record, in request order."""
    final = {r["i"]: r for r in records if r.get("event") in ("done", "error")}
    return [final[i] for i in sorted(final)]


def _summary(outcomes: list[dict[str, Any]]) -> list[str]:
    return [o.get("code") or o["route"]["prefill_mode"] for o in outcomes]


def _check_listeners(host: Host, listening: list[Listener]) -> None:
    """Specific addresses: the node's or loopback. Wildcards: Ray's pinned ports, plus at
    most one per Serve replica process: Serve's inter-deployment gRPC server, which Ray
    2.60 binds to ``[::]:0`` (ray/serve/_private/replica.py) on any node."""
    extra: dict[int | None, list[Listener]] = {}
    for entry in listening:
        if not entry.wildcard:
            assert entry.host in (host.ip, LOCAL), f"{host.netns}: {entry}"
        elif entry.port not in RAY_WILDCARD_PORTS:
            extra.setdefault(entry.pid, []).append(entry)
    for pid, wide in extra.items():
        theirs = [e for e in listening if e.pid == pid]
        serve_replica = wide[0].process.startswith("ray::ServeRepli")
        assert serve_replica and len(wide) == 1, f"{host.netns}: {wide} bind every address {theirs}"


def _pid_listening(host: Host, address: str) -> int:
    want = _address(address)
    pids = {e.pid for e in host.listeners() if (e.host, e.port) == want}
    assert len(pids) == 1 and None not in pids, f"{host.netns}: who listens on {address}?"
    return int(pids.pop())


def _environ(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(item.decode(errors="replace").partition("=")[::2] for item in raw if item)


def _address(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host, int(port)


def _host_of(address: str) -> str:
    return _address(address)[0]
