"""Ray 2.60 token authentication, as seen from a client (the job client, a local cluster's probes).

A cluster started with `RAY_AUTH_MODE=token` rejects requests without its token. The client reads
the token the way Ray does (`RAY_AUTH_TOKEN`, the file named by `RAY_AUTH_TOKEN_PATH`,
`~/.ray/auth_token`) and sends it whenever it finds one, unless `RAY_AUTH_MODE=disabled`, so a first
submit works without exporting anything; when the cluster still refuses, the error says where the
token comes from. The token goes only over https or to this machine (loopback, e.g. a
`kubectl port-forward`): never in clear text across a network, and never along a redirect to
another host (`open_url`).
"""

from __future__ import annotations

import ipaddress
import os
import urllib.error
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit


class AuthError(RuntimeError):
    """No usable token where the cluster requires one; the message says where tokens come from."""


def auth_token(env: Mapping[str, str] = os.environ) -> str | None:
    """The Ray auth token this client has, looked up in Ray's order; None when there is none."""
    if env.get("RAY_AUTH_TOKEN", "").strip():
        return env["RAY_AUTH_TOKEN"].strip()
    path = Path(env.get("RAY_AUTH_TOKEN_PATH") or Path(env.get("HOME", "~")).expanduser() / ".ray" / "auth_token")
    if path.is_file() and (token := path.read_text().strip()):
        return token
    return None


def safe_for_token(address: str) -> bool:
    """Whether a token may go to `address`: over https, or to this machine (loopback)."""
    parts = urlsplit(address if "://" in address else f"http://{address}")
    if parts.scheme in ("https", "wss"):
        return True
    host = parts.hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def auth_headers(env: Mapping[str, str] = os.environ, address: str | None = None) -> dict[str, str]:
    """HTTP headers for the job server at `address`: the bearer token unless RAY_AUTH_MODE=disabled,
    or `address` is plain http to another machine (then nothing, or AuthError when the mode is token)."""
    mode = env.get("RAY_AUTH_MODE", "").strip().lower()
    if mode == "disabled":
        return {}
    token = auth_token(env)
    if token and address is not None and not safe_for_token(address):
        if mode == "token":
            raise AuthError(withheld_message(address))
        return {}
    if token:
        return {"Authorization": f"Bearer {token}"}
    if mode == "token":
        raise AuthError("RAY_AUTH_MODE=token but no Ray auth token was found: export RAY_AUTH_TOKEN, point "
                        "RAY_AUTH_TOKEN_PATH at a token file, or save the cluster's token to ~/.ray/auth_token "
                        "(`ray get-auth-token` on the head prints it; on KubeRay it is in the Secret named "
                        "by authOptions).")
    return {}


def withheld_message(address: str) -> str:
    return (f"the Ray auth token is not sent to {address}: plain http to another machine would show it to the "
            "network. Put TLS in front of the dashboard (https://...), or tunnel to it and use a loopback "
            "address (`kubectl port-forward svc/<head> 8265`, `ray dashboard`, `ssh -L 8265:localhost:8265`).")


class _SameHostRedirects(urllib.request.HTTPRedirectHandler):
    """Follow a redirect only to the same scheme, host and port: urllib would carry the
    Authorization header to wherever the server points."""

    def redirect_request(self, req: Any, fp: Any, code: int, msg: str, headers: Any, newurl: str) -> Any:
        old, new = urlsplit(req.full_url), urlsplit(newurl)
        if (old.scheme, old.netloc) != (new.scheme, new.netloc):
            raise urllib.error.HTTPError(req.full_url, code, f"refused a redirect from {old.netloc} to another "
                                         f"host ({new.scheme}://{new.netloc}): the request carries the auth token",
                                         headers, fp)
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def open_url(request: urllib.request.Request, timeout: float) -> Any:
    """`urllib.request.urlopen` that refuses redirects to another host."""
    return urllib.request.build_opener(_SameHostRedirects).open(request, timeout=timeout)


def auth_failure_message(address: str, error: Exception) -> str:
    if auth_token() is not None and not safe_for_token(address):
        return withheld_message(address)
    sent = auth_token() is not None and os.environ.get("RAY_AUTH_MODE", "").lower() != "disabled"
    problem = ("rejected the token this client sent (it is not the cluster's token)" if sent
               else "requires token authentication and this client has no token")
    return (f"the Ray cluster at {address} {problem}.\n"
            "  Get the cluster's token: `ray get-auth-token` on the head node (KubeRay: the Secret named by\n"
            "  spec.authOptions), then save it to ~/.ray/auth_token, or export RAY_AUTH_TOKEN=<token>, or\n"
            "  RAY_AUTH_TOKEN_PATH=<file>. A cluster started with RAY_AUTH_MODE=disabled needs none.\n"
            f"  (Ray said: {str(getattr(error, 'message', error)).splitlines()[0]})")


