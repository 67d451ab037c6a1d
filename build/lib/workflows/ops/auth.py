"""Ray 2.60 token authentication, as seen from a client (the job client, a local cluster's probes).

A cluster started with `RAY_AUTH_MODE=token` rejects requests without its token. The client reads
the token the way Ray does (`RAY_AUTH_TOKEN`, the file named by `RAY_AUTH_TOKEN_PATH`,
`~/.ray/auth_token`) and sends it whenever it finds one, unless `RAY_AUTH_MODE=disabled`, so a first
submit works without exporting anything; when the cluster still refuses, the error says where the
token comes from.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path


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


def auth_headers(env: Mapping[str, str] = os.environ) -> dict[str, str]:
    """HTTP headers for the job server: the bearer token unless RAY_AUTH_MODE=disabled."""
    mode = env.get("RAY_AUTH_MODE", "").strip().lower()
    if mode == "disabled":
        return {}
    token = auth_token(env)
    if token:
        return {"Authorization": f"Bearer {token}"}
    if mode == "token":
        raise AuthError("RAY_AUTH_MODE=token but no Ray auth token was found: export RAY_AUTH_TOKEN, point "
                        "RAY_AUTH_TOKEN_PATH at a token file, or save the cluster's token to ~/.ray/auth_token "
                        "(`ray get-auth-token` on the head prints it; on KubeRay it is in the Secret named "
                        "by authOptions).")
    return {}


def auth_failure_message(address: str, error: Exception) -> str:
    sent = auth_token() is not None and os.environ.get("RAY_AUTH_MODE", "").lower() != "disabled"
    problem = ("rejected the token this client sent (it is not the cluster's token)" if sent
               else "requires token authentication and this client has no token")
    return (f"the Ray cluster at {address} {problem}.\n"
            "  Get the cluster's token: `ray get-auth-token` on the head node (KubeRay: the Secret named by\n"
            "  spec.authOptions), then save it to ~/.ray/auth_token, or export RAY_AUTH_TOKEN=<token>, or\n"
            "  RAY_AUTH_TOKEN_PATH=<file>. A cluster started with RAY_AUTH_MODE=disabled needs none.\n"
            f"  (Ray said: {str(getattr(error, 'message', error)).splitlines()[0]})")


