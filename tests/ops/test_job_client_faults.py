"""The job client under hostile conditions: a plain-http address on another host, a redirect to
another host, a log stream that goes silent without closing. No Ray cluster: fakes and a local HTTP
server stand in for the job server."""

from __future__ import annotations

import asyncio
import http.server
import io
import json
import socket
import threading
from types import SimpleNamespace

import pytest

from workflows.ops import auth, jobs

TOKEN_ENV = {"RAY_AUTH_TOKEN": "s3cret"}


@pytest.mark.parametrize("address, sent", [
    ("http://10.0.0.5:8265", False), ("10.0.0.5:8265", False), ("http://ray-head.example.com:8265", False),
    ("https://ray-head.example.com", True), ("http://127.0.0.1:8265", True), ("http://localhost:8265", True),
    ("http://[::1]:8265", True),
])
def test_the_token_goes_only_over_https_or_to_loopback(address, sent):
    headers = auth.auth_headers(TOKEN_ENV, address=address)
    assert (headers == {"Authorization": "Bearer s3cret"}) is sent
    if not sent:
        assert headers == {}


def test_token_mode_to_a_plain_http_remote_is_refused_naming_the_fix():
    with pytest.raises(auth.AuthError, match="port-forward"):
        auth.auth_headers({**TOKEN_ENV, "RAY_AUTH_MODE": "token"}, address="http://10.0.0.5:8265")


class Recorder(http.server.BaseHTTPRequestHandler):
    seen: list = []
    location = ""

    def do_GET(self):
        type(self).seen.append((self.server.server_address[0], self.headers.get("Authorization")))
        if self.location:
            self.send_response(302)
            self.send_header("Location", self.location)
            self.end_headers()
            return
        self.send_response(200)
        self.end_headers()
        self.wfile.write(b'{"data": {"summary": []}}')

    def log_message(self, *args):
        pass


def serve(host: str, handler):
    server = http.server.HTTPServer((host, 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def test_a_redirect_to_another_host_never_carries_the_token(monkeypatch):
    monkeypatch.setenv("RAY_AUTH_TOKEN", "s3cret")
    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    other_host = type("Other", (Recorder,), {"seen": [], "location": ""})
    elsewhere = serve("127.0.0.2", other_host)
    redirecting = type("Redirecting", (Recorder,), {"seen": [], "location": f"http://127.0.0.2:{elsewhere.server_port}/x"})
    head = serve("127.0.0.1", redirecting)
    try:
        jobs.cluster_on_this_machine(f"http://127.0.0.1:{head.server_port}")
        error = None
    except jobs.JobsError as e:
        error = str(e)
    finally:
        head.shutdown()
        elsewhere.shutdown()
    assert other_host.seen == []  # the token never went to the other host
    assert redirecting.seen == [("127.0.0.1", "Bearer s3cret")]
    assert error and "refused a redirect" in error


class NodeTable(http.server.BaseHTTPRequestHandler):
    """A dashboard's `/nodes?view=summary` answering `nodes`."""
    nodes: list = []

    def do_GET(self):
        self.send_response(200)
        self.end_headers()
        self.wfile.write(json.dumps({"data": {"summary": self.nodes}}).encode())

    def log_message(self, *args):
        pass


def _registered(hostname: str, ip: str) -> dict:
    """A node as the dashboard lists it once the GCS has it ALIVE and before its reporter agent sent
    the physical stats (the top-level `hostname`, `ip`, ...): only the `raylet` part."""
    return {"raylet": {"state": "ALIVE", "nodeManagerHostname": hostname, "nodeManagerAddress": ip}}


@pytest.mark.parametrize("hostname, ip, local", [
    (socket.gethostname(), "127.0.0.1", True), ("ray-worker-0", "127.0.0.1", False),
    (socket.gethostname(), "10.255.0.9", False),
])
def test_a_node_is_placed_by_what_the_gcs_registered_before_its_agent_reports(hostname, ip, local):
    table = type("Table", (NodeTable,), {"nodes": [_registered(socket.gethostname(), "127.0.0.1"),
                                                   _registered(hostname, ip)]})
    server = serve("127.0.0.1", table)
    try:
        assert jobs.cluster_on_this_machine(f"http://127.0.0.1:{server.server_port}") is local
    finally:
        server.shutdown()


class SilentStreamClient:
    """A job server whose log stream sends one line and then nothing, never closing."""

    def __init__(self, statuses):
        self.statuses = list(statuses)

    async def tail_job_logs(self, job_id):
        yield "step 1\n"
        await asyncio.Event().wait()  # the connection dropped silently

    def get_job_info(self, job_id):
        status = self.statuses.pop(0) if len(self.statuses) > 1 else self.statuses[0]
        return SimpleNamespace(status=status, driver_exit_code=0 if status == "SUCCEEDED" else None, message=None)


def run_guarded(fn):
    """`fn()` in a thread; a wait that never returns fails the test instead of hanging the suite."""
    result = {}

    def target():
        try:
            result["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - handed to the test
            result["error"] = e

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(60)
    assert not thread.is_alive(), "the wait never returned"
    if "error" in result:
        raise result["error"]
    return result["value"]


def test_a_silent_log_stream_does_not_outlive_the_job():
    out = io.StringIO()
    client = SilentStreamClient(["RUNNING", "RUNNING", "SUCCEEDED"])
    outcome = run_guarded(lambda: jobs.wait_for_job(client, "job", out=out, poll_s=0.01, drain_s=0.01))
    assert (outcome.status, outcome.exit_code) == ("SUCCEEDED", 0)
    assert out.getvalue() == "step 1\n"


def test_a_wait_stops_at_its_deadline_while_the_job_runs_on():
    client = SilentStreamClient(["RUNNING"])
    with pytest.raises(TimeoutError, match="still RUNNING"):
        run_guarded(lambda: jobs.wait_for_job(client, "job", out=io.StringIO(), poll_s=0.01, timeout=0.05))
