"""Deny by default in front of vLLM's OpenAI server: toushi's ASGI middleware, given to the server with
``--middleware toushi.engines.guard.ServeGuard``.

vLLM's own key check guards only paths under ``/v1``, ``/v2``, ``/inference`` and ``/cohere``;
``/invocations`` (full chat completions), ``/tokenize``, ``/metrics``, ``/docs`` and whatever a vLLM
release adds stay open. This middleware sits outside every route, so every request, of any path or method
(``OPTIONS`` too), needs ``Authorization: Bearer <key>`` when the server has a key; only ``GET /health``
answers without one (health checks and toushi's own start-up wait). Keys are compared as sha256 digests with
:func:`hmac.compare_digest` (constant time).

On a loopback bind the ``Host`` header must name a loopback address (``localhost``, ``127.0.0.1``, ``[::1]``):
a web page the user opens can make the browser send requests to 127.0.0.1 under its own domain name (DNS
rebinding), and those carry that name as Host. Each request may ask for at most ``n``, ``max_tokens`` and
``logprobs`` as the recipe's ``serve.limits`` say, wherever those fields sit in the JSON body (batch and
``/inference`` bodies nest them); a request over a limit gets 400 and a message naming it.

The server process reads its settings from the environment (vLLM builds the middleware with no arguments):
the key from ``VLLM_API_KEY``, the rest as JSON from ``TOUSHI_SERVE_GUARD`` (no secret in it).
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
import os

GUARD_ENV = "TOUSHI_SERVE_GUARD"
OPEN_PATHS = {("GET", "/health"), ("HEAD", "/health")}
# body fields each limit covers (chat uses max_completion_tokens, responses max_output_tokens, ...)
LIMITED = {
    "n": ("n", "best_of"),
    "max_tokens": ("max_tokens", "max_completion_tokens", "max_output_tokens", "max_new_tokens"),
    "logprobs": ("logprobs", "top_logprobs", "prompt_logprobs"),
}


def guard_env(loopback: bool, n: int, max_tokens: int, logprobs: int) -> str:
    """The TOUSHI_SERVE_GUARD value for a server."""
    return json.dumps({"loopback": loopback, "limits": {"n": n, "max_tokens": max_tokens, "logprobs": logprobs}})


def loopback_host(host_header: str | None) -> bool:
    """Whether a Host header (``name[:port]``, ``[v6]:port``) names a loopback address."""
    if not host_header:
        return False
    host = host_header.strip()
    if host.startswith("["):
        host = host[1:].split("]", 1)[0]
    elif host.count(":") == 1:
        host = host.split(":", 1)[0]
    if host.lower().rstrip(".") == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def over_limit(body, limits: dict[str, int]) -> str | None:
    """The first field of a JSON body (searched at every depth) above its limit, as a message; or None."""
    todo = [body]
    while todo:
        node = todo.pop()
        if isinstance(node, list):
            todo.extend(node)
        elif isinstance(node, dict):
            for key, value in node.items():
                if isinstance(value, (dict, list)):
                    todo.append(value)
                    continue
                for limit, fields in LIMITED.items():
                    # bool is an int in Python: chat's "logprobs": true is a switch, not a count
                    if key in fields and isinstance(value, int) and not isinstance(value, bool) \
                            and value > limits[limit]:
                        return f"{key}={value} is above this server's limit of {limits[limit]} (serve.limits.{limit})"
    return None


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8")).digest()


class ServeGuard:
    """Pure ASGI middleware: Host check (loopback binds), key on every route but /health, request limits."""

    def __init__(self, app) -> None:
        self.app = app
        cfg = json.loads(os.environ.get(GUARD_ENV) or "{}")
        key = os.environ.get("VLLM_API_KEY")
        self.key = _digest(key) if key else None
        self.loopback = bool(cfg.get("loopback", True))
        self.limits = cfg.get("limits") or {"n": 16, "max_tokens": 8192, "logprobs": 20}

    def _authorized(self, headers: dict[bytes, bytes]) -> bool:
        scheme, _, given = headers.get(b"authorization", b"").decode("latin-1").partition(" ")
        # compare digests, so neither the length nor the content of the key leaks through timing
        return scheme.lower() == "bearer" and hmac.compare_digest(_digest(given.strip()), self.key)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] not in ("http", "websocket"):  # lifespan: start-up and shut-down of the app
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        method = scope.get("method", "GET")
        path = scope["path"].removeprefix(scope.get("root_path", "") or "") or "/"
        if self.loopback and not loopback_host(headers.get(b"host", b"").decode("latin-1")):
            await _deny(scope, receive, send, 403, "Host not allowed: this server answers only to a loopback name "
                        "(localhost, 127.0.0.1, [::1])")
            return
        if (method, path) not in OPEN_PATHS and self.key is not None and not self._authorized(headers):
            await _deny(scope, receive, send, 401, "Unauthorized: send Authorization: Bearer <key>")
            return
        if scope["type"] != "http" or method != "POST":
            await self.app(scope, receive, send)
            return
        body, more = b"", True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
        try:
            problem = over_limit(json.loads(body), self.limits) if body else None
        except ValueError:
            problem = None  # not JSON: the route itself answers that
        if problem:
            await _deny(scope, receive, send, 400, problem)
            return
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


async def _deny(scope, receive, send, status: int, message: str) -> None:
    if scope["type"] == "websocket":  # refuse the handshake (the client sees HTTP 403)
        await receive()
        await send({"type": "websocket.close", "code": 1008, "reason": message[:120]})
        return
    kind = {400: "BadRequestError", 401: "AuthenticationError", 403: "PermissionDeniedError"}[status]
    payload = json.dumps({"error": {"message": message, "type": kind, "code": status}}).encode()
    extra = [(b"www-authenticate", b"Bearer")] if status == 401 else []
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode()),
                            *extra]})
    await send({"type": "http.response.body", "body": payload})
