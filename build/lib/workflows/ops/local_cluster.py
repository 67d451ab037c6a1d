"""A private Ray head (and optional worker nodes) on this machine, stopped without `ray stop`.

`ray stop` has no address filter: it kills every Ray process of the machine, including other
people's clusters. A private head instead runs `ray start --head --block` in its own session
(`Popen(start_new_session=True)`), on free ports and in its own short temp dir, and is stopped by
killing exactly the processes that descend from it:

- Ray's system processes (GCS, raylet, dashboard, agents) share the `ray start` process group,
  but every Ray worker and every job driver gets a process group of its own, and a driver of a
  still-running job outlives a `killpg` of the head. So `stop()` first freezes the whole
  descendant tree with SIGSTOP (a stopped process cannot fork, so the snapshot is complete), then
  SIGKILLs the process group and every snapshotted pid.
- Worker nodes started by `add_worker` are separate `ray start --block` sessions; they are stopped
  the same way, before the head.

Used by the job tests, and by `cluster/local/` through `python -m workflows.ops.local_cluster`, which
records the processes in a state file so a later `stop` (another process) kills exactly them.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import psutil

from workflows.ops.auth import auth_headers, auth_token

AUTH_MODES = ("disabled", "token")


def free_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    """`n` distinct ports that were free a moment ago (all held open together so they differ)."""
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(n)]
        for s in socks:
            s.bind((host, 0))
        return [s.getsockname()[1] for s in socks]


def _ray_executable() -> str:
    """The `ray` script of this interpreter's environment (so head and client Ray versions match)."""
    beside = Path(sys.executable).parent / "ray"
    found = str(beside) if beside.is_file() else shutil.which("ray")
    if not found:
        raise RuntimeError(f"no `ray` executable beside {sys.executable} or on PATH; install ray[default]")
    return found


@dataclass
class RayNodeProcess:
    """One `ray start --block` process: the leader of its own session and process group."""

    pid: int
    create_time: float
    log: str

    def process(self) -> psutil.Process | None:
        """The live process, or None if it exited or the pid now belongs to someone else."""
        try:
            p = psutil.Process(self.pid)
            if abs(p.create_time() - self.create_time) > 0.01 or p.status() == psutil.STATUS_ZOMBIE:
                return None
            return p
        except psutil.NoSuchProcess:
            return None

    def alive(self) -> bool:
        return self.process() is not None


def _freeze_tree(root: psutil.Process) -> list[psutil.Process]:
    """SIGSTOP `root` and all its descendants until no new descendant appears; return them all."""
    frozen: dict[int, psutil.Process] = {}
    pending = [root]
    while pending:
        for p in pending:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.send_signal(signal.SIGSTOP)
                frozen[p.pid] = p
        try:
            tree = root.children(recursive=True)
        except psutil.NoSuchProcess:
            tree = []
        for p in list(frozen.values()):
            with contextlib.suppress(psutil.NoSuchProcess):
                tree.extend(p.children(recursive=True))  # orphans re-parented away from root
        pending = [p for p in tree if p.pid not in frozen]
    return list(frozen.values())


def kill_node_tree(node: RayNodeProcess, timeout: float = 10.0) -> None:
    """Kill a `ray start --block` process, its process group and every process descended from it."""
    root = node.process()
    if root is None:
        return
    procs = _freeze_tree(root)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(node.pid, signal.SIGKILL)  # the leader's group: GCS, raylet, dashboard, agents
    for p in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()  # workers and job drivers, each in a group of its own
    gone, alive = psutil.wait_procs(procs, timeout=timeout)
    if alive:
        raise RuntimeError(f"Ray processes survived SIGKILL: {[p.pid for p in alive]}")


def _start_node(args: list[str], log: Path, env: dict[str, str], prefix: Sequence[str] = ()) -> RayNodeProcess:
    """`ray start --block ARGS` in a session of its own; `prefix` wraps the command (it must exec it,
    e.g. `unshare -m ... sh -c '...; exec "$@"' sh`, so that the pid stays the node's)."""
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            [*prefix, _ray_executable(), "start", "--block", *args],
            stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True, env=env,
        )
    return RayNodeProcess(pid=proc.pid, create_time=psutil.Process(proc.pid).create_time(), log=str(log))


@dataclass
class PrivateHead:
    """A running private head. `dashboard_url` is what `loraflow submit --address` takes."""

    temp_dir: str
    gcs_address: str
    dashboard_url: str
    auth_mode: str
    head: RayNodeProcess
    workers: list[RayNodeProcess] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict, repr=False)

    def processes(self) -> list[psutil.Process]:
        """Every live process of this cluster (node leaders and all their descendants)."""
        found: list[psutil.Process] = []
        for node in [self.head, *self.workers]:
            p = node.process()
            if p is not None:
                with contextlib.suppress(psutil.NoSuchProcess):
                    found += [p, *p.children(recursive=True)]
        return found

    def add_worker(self, num_cpus: int = 1, resources: dict[str, float] | None = None, timeout: float = 60.0,
                   prefix: Sequence[str] = (), env: dict[str, str] | None = None) -> RayNodeProcess:
        """Start one more node of this cluster on this machine and wait until the head sees it.

        `prefix` wraps its `ray start` (a mount namespace, say); `env` adds to the head's environment."""
        expected = _alive_node_count(self.dashboard_url, self.env) + 1
        (agent_port,) = free_ports(1)
        args = [f"--address={self.gcs_address}", f"--num-cpus={num_cpus}", f"--temp-dir={self.temp_dir}",
                f"--dashboard-agent-listen-port={agent_port}", "--min-worker-port=0", "--max-worker-port=0",
                "--disable-usage-stats"]
        if resources:
            args.append(f"--resources={json.dumps(resources)}")
        log = Path(self.temp_dir) / f"worker-{len(self.workers) + 1}.out"
        node = _start_node(args, log, {**self.env, **(env or {})}, prefix)
        self.workers.append(node)
        _wait_until(lambda: _alive_node_count(self.dashboard_url, self.env) >= expected, node, timeout,
                    f"worker node to join {self.gcs_address}")
        return node

    def stop(self, remove_temp_dir: bool = True) -> None:
        """Kill exactly this cluster's processes (workers first, then the head)."""
        failures = []
        for node in [*self.workers, self.head]:
            try:
                kill_node_tree(node)
            except RuntimeError as e:  # keep going: the other nodes must still be stopped
                failures.append(str(e))
        if failures:
            raise RuntimeError("; ".join(failures))
        if remove_temp_dir:
            shutil.rmtree(self.temp_dir, ignore_errors=True)

    def to_state(self) -> dict:
        state = asdict(self)
        state.pop("env")
        return state

    @classmethod
    def from_state(cls, state: dict) -> PrivateHead:
        state = dict(state)
        head = RayNodeProcess(**state.pop("head"))
        workers = [RayNodeProcess(**w) for w in state.pop("workers")]
        return cls(head=head, workers=workers, **state)


def _get_json(url: str, env: dict[str, str]) -> dict:
    req = urllib.request.Request(url, headers=auth_headers(env))
    with urllib.request.urlopen(req, timeout=5) as r:
        return json.load(r)


def _alive_node_count(dashboard_url: str, env: dict[str, str]) -> int:
    nodes = _get_json(f"{dashboard_url}/nodes?view=summary", env)["data"]["summary"]
    return sum(1 for n in nodes if n.get("raylet", {}).get("state") == "ALIVE")


def _wait_until(ready, node: RayNodeProcess, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if not node.alive():
            raise RuntimeError(f"`ray start` exited while waiting for the {what}; log {node.log}:\n"
                               + _tail(node.log))
        with contextlib.suppress(OSError, urllib.error.URLError, KeyError, ValueError):
            if ready():
                return
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for the {what}; log {node.log}:\n"
                               + _tail(node.log))
        time.sleep(0.25)


def _tail(path: str, lines: int = 30) -> str:
    with contextlib.suppress(OSError):
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-lines:])
    return "(no log)"


def start_head(num_cpus: int = 2, *, auth_mode: str = "disabled", dashboard_host: str = "127.0.0.1",
               env: dict[str, str] | None = None, temp_root: str | None = None,
               resources: dict[str, float] | None = None, timeout: float = 90.0) -> PrivateHead:
    """Start `ray start --head --block` on free ports in a new short temp dir; return when its job
    server answers. `auth_mode` is set explicitly (RAY_AUTH_MODE) because otherwise Ray 2.60 turns
    token auth on only if a token file happens to exist. `env` adds to this process's environment."""
    if auth_mode not in AUTH_MODES:
        raise ValueError(f"auth_mode must be one of {AUTH_MODES}, got {auth_mode!r}")
    node_env = {**os.environ, **(env or {}), "RAY_AUTH_MODE": auth_mode}
    # Job entrypoints such as `loraflow run` resolve through PATH: put this environment's bin first.
    node_env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), node_env.get("PATH", "")])
    if auth_mode == "token":
        _ensure_token(node_env)
    # Short: Ray puts AF_UNIX sockets (107-byte path limit) several levels below it.
    temp_dir = tempfile.mkdtemp(prefix="lf-", dir=temp_root or "/tmp")
    gcs, dash, agent, client = free_ports(4)
    connect_host = "127.0.0.1" if dashboard_host in ("127.0.0.1", "0.0.0.0", "localhost") else dashboard_host
    args = ["--head", f"--port={gcs}", "--include-dashboard=true", f"--dashboard-host={dashboard_host}",
            f"--dashboard-port={dash}", f"--dashboard-agent-listen-port={agent}", f"--ray-client-server-port={client}",
            "--min-worker-port=0", "--max-worker-port=0", f"--num-cpus={num_cpus}", f"--temp-dir={temp_dir}",
            "--disable-usage-stats"]
    if resources:
        args.append(f"--resources={json.dumps(resources)}")
    head_proc = _start_node(args, Path(temp_dir) / "head.out", node_env)
    head = PrivateHead(temp_dir=temp_dir, gcs_address=f"127.0.0.1:{gcs}", dashboard_url=f"http://{connect_host}:{dash}",
                       auth_mode=auth_mode, head=head_proc, env=node_env)
    try:
        _wait_until(lambda: _alive_node_count(head.dashboard_url, node_env) >= 1, head_proc, timeout, "head node")
    except BaseException:
        head.stop()
        raise
    return head


@contextlib.contextmanager
def private_head(num_cpus: int = 2, **kwargs) -> Iterator[PrivateHead]:
    """`start_head(...)` for the duration of a `with` block; always stops exactly that cluster."""
    head = start_head(num_cpus, **kwargs)
    try:
        yield head
    finally:
        head.stop()


# ---- `python -m workflows.ops.local_cluster start|stop|status` (used by cluster/local/*.sh) ----

def _main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m workflows.ops.local_cluster",
                                     description="A private local Ray cluster, stopped without `ray stop`.")
    parser.add_argument("action", choices=["start", "stop", "status"])
    parser.add_argument("--state", default=os.environ.get("LORAFLOW_LOCAL_STATE", "/tmp/loraflow-local.json"),
                        help="where `start` records the processes that `stop` kills (default: %(default)s)")
    parser.add_argument("--num-cpus", type=int, default=os.cpu_count() or 2, help="logical CPUs of the head")
    parser.add_argument("--workers", type=int, default=0, help="extra worker nodes on this machine")
    parser.add_argument("--worker-cpus", type=int, default=1)
    parser.add_argument("--dashboard-host", default="127.0.0.1",
                        help="0.0.0.0 exposes the dashboard and job API to the network")
    parser.add_argument("--auth-mode", choices=AUTH_MODES, default=os.environ.get("RAY_AUTH_MODE", "token"))
    args = parser.parse_args(argv)
    state_path = Path(args.state)

    if args.action == "start":
        if state_path.exists() and PrivateHead.from_state(json.loads(state_path.read_text())).head.alive():
            print(f"a cluster recorded in {state_path} is still running; stop it first", file=sys.stderr)
            return 1
        head = start_head(args.num_cpus, auth_mode=args.auth_mode, dashboard_host=args.dashboard_host)
        try:
            for _ in range(args.workers):
                head.add_worker(num_cpus=args.worker_cpus)
        except BaseException:
            head.stop()
            raise
        state_path.write_text(json.dumps(head.to_state(), indent=2))
        print(f"Ray head up: dashboard and job API {head.dashboard_url}, GCS {head.gcs_address}, "
              f"{len(head.workers)} extra worker node(s), RAY_AUTH_MODE={head.auth_mode}")
        print(f"logs: {head.temp_dir}   state: {state_path}")
        print(f"submit: loraflow submit configs/demo.yaml --address {head.dashboard_url}")
        return 0

    if not state_path.exists():
        print(f"no cluster recorded in {state_path}", file=sys.stderr)
        return 1 if args.action == "status" else 0
    head = PrivateHead.from_state(json.loads(state_path.read_text()))
    if args.action == "status":
        print(json.dumps({**head.to_state(), "alive_processes": len(head.processes())}, indent=2))
        return 0 if head.head.alive() else 1
    head.stop()
    state_path.unlink()
    print(f"stopped the cluster at {head.dashboard_url} (and only it)")
    return 0


def _ensure_token(env: dict[str, str]) -> None:
    """Token mode needs a token: keep RAY_AUTH_TOKEN or the token file, else create ~/.ray/auth_token."""
    if auth_token(env):
        return
    subprocess.run([_ray_executable(), "get-auth-token", "--generate"], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    print(f"generated a Ray auth token in {Path(env.get('HOME', '~')).expanduser() / '.ray' / 'auth_token'} "
          "(clients on other machines need a copy, or RAY_AUTH_TOKEN)", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(_main())
