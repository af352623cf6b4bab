"""A strict stand-in for the SCM token endpoint, over HTTPS on 127.0.0.1 with a throwaway CA.

It demands what the real endpoint demands (pan.dev's access-token page): POST
to the token path, HTTP Basic client credentials, a form-encoded body with
grant_type=client_credentials and the service account's scope. Wrong
credentials get 401 invalid_client, a wrong body 400, as the real one answers.
Tests can queue other answers (status, headers, body, delays, cut bodies).

Run `python tests/fake_scm.py --demo` to watch the tool work with no account.
"""
from __future__ import annotations

import base64
import itertools
import json
import os
import secrets
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs

import trustme

TOKEN_PATH = "/auth/v1/oauth2/access_token"
LEGACY_TOKEN_PATH = "/oauth2/access_token"
CLIENT_ID = "demo-sa@1234567890.iam.panserviceaccount.com"
SCOPE = "tsg_id:1234567890"
LIFETIME = 899


@dataclass
class Answer:
    """One scripted answer; `cut` closes the connection halfway through the body."""

    status: int = 200
    body: Any = None  # dict -> JSON, str/bytes -> as is, None -> a valid token answer
    headers: dict = field(default_factory=dict)
    delay: float = 0.0
    cut: bool = False
    hang_up: bool = False  # close the connection without any answer


@dataclass
class Request:
    method: str
    path: str
    headers: dict
    body: bytes
    at: float = field(default_factory=time.monotonic)


class QuietServer(ThreadingHTTPServer):
    def handle_error(self, request: Any, client_address: Any) -> None:
        """Stay quiet when a client hangs up first (timeouts do that); report anything else."""
        if not isinstance(sys.exc_info()[1], (ConnectionError, ssl.SSLError)):
            super().handle_error(request, client_address)


class FakeSCM:
    """The token endpoint. `requests` records every request; `answers` is a queue tried first."""

    def __init__(self, client_secret: str | None = None, tls: bool = True) -> None:
        self.client_id = CLIENT_ID
        self.client_secret = client_secret or "secret-" + secrets.token_hex(16)
        self.scope = SCOPE
        self.lifetime = LIFETIME
        self.delay = 0.0
        self.answers: list[Answer] = []
        self.requests: list[Request] = []
        self.issued: list[str] = []
        self._lock = threading.Lock()
        self._counter = itertools.count(1)
        self.ca = trustme.CA()
        self.server = QuietServer(("127.0.0.1", 0), self._handler_class())
        self.server.daemon_threads = True
        self.scheme = "https" if tls else "http"  # plain http: the tool allows it for loopback only
        if tls:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            self.ca.issue_cert("127.0.0.1", "localhost").configure_cert(context)
            self.server.socket = context.wrap_socket(self.server.socket, server_side=True)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.server.server_address[1]}{TOKEN_PATH}"

    def start(self) -> FakeSCM:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def reset(self) -> None:
        with self._lock:
            self.answers.clear()
            self.requests.clear()
            self.issued.clear()
            self.delay = 0.0
            self.lifetime = LIFETIME

    def write_ca(self, path: str) -> str:
        self.ca.cert_pem.write_to_path(path)
        return path

    def config(self, **extra: Any) -> dict:
        """A config document pointing at this endpoint."""
        return {"client_id": self.client_id, "client_secret": self.client_secret, "scope": self.scope,
                "auth_url": self.url, **extra}

    def _next_answer(self) -> Answer | None:
        with self._lock:
            return self.answers.pop(0) if self.answers else None

    def _check(self, request: Request) -> tuple[int, dict]:
        """Judge a request as the real endpoint would; (200, token answer) when it passes."""
        if request.method != "POST":
            return 405, {"error": "invalid_request", "error_description": "method not allowed"}
        if request.path not in (TOKEN_PATH, LEGACY_TOKEN_PATH):
            return 404, {"error": "not_found"}
        auth = request.headers.get("authorization", "")
        expected = base64.b64encode(f"{self.client_id}:{self.client_secret}".encode()).decode()
        if auth != f"Basic {expected}":
            return 401, {"error": "invalid_client", "error_description": "Client authentication failed"}
        if request.headers.get("content-type", "").split(";")[0].strip() != "application/x-www-form-urlencoded":
            return 400, {"error": "invalid_request", "error_description": "form-encoded body required"}
        try:
            form = parse_qs(request.body.decode("ascii"), strict_parsing=True)
        except (UnicodeDecodeError, ValueError):
            return 400, {"error": "invalid_request", "error_description": "malformed body"}
        if form.get("grant_type") != ["client_credentials"]:
            return 400, {"error": "unsupported_grant_type",
                         "error_description": "grant_type must be client_credentials"}
        if form.get("scope") != [self.scope]:
            return 400, {"error": "invalid_scope", "error_description": "scope not allowed"}
        token = f"eyJhbGciOiJSUzI1NiJ9.fake{next(self._counter)}.{secrets.token_urlsafe(24)}"
        with self._lock:
            self.issued.append(token)
        # The real endpoint answers a wider scope than asked.
        return 200, {"access_token": token, "scope": f"profile {self.scope} email", "token_type": "Bearer",
                     "expires_in": self.lifetime}

    def _handler_class(self) -> type:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass  # keep test output clean (and free of anything the client sent)

            def do_POST(self) -> None:
                self._serve()

            do_GET = do_PUT = do_POST

            def _serve(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                request = Request(self.command, self.path, {k.lower(): v for k, v in self.headers.items()},
                                  self.rfile.read(length))
                with fake._lock:
                    fake.requests.append(request)
                answer = fake._next_answer() or Answer()
                time.sleep(answer.delay or fake.delay)
                if answer.hang_up:
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                if answer.body is None and answer.status == 200:
                    status, body = fake._check(request)
                else:
                    status, body = answer.status, answer.body
                if isinstance(body, (dict, list)) or body is None:
                    payload = json.dumps(body if body is not None else {}).encode()
                    content_type = "application/json"
                else:
                    payload = body.encode() if isinstance(body, str) else body
                    content_type = answer.headers.get("Content-Type", "application/json")
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(payload)))
                for name, value in answer.headers.items():
                    if name != "Content-Type":
                        self.send_header(name, value)
                self.end_headers()
                if answer.cut:
                    self.wfile.write(payload[: len(payload) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                self.wfile.write(payload)

        return Handler


def demo() -> int:
    """Run the tool twice through the wrapper against this stand-in; show output and log."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    fake = FakeSCM().start()
    try:
        with tempfile.TemporaryDirectory(prefix="scm-token-cache-demo-") as work:
            config = os.path.join(work, "scm-auth.json")
            with open(os.open(config, os.O_WRONLY | os.O_CREAT, 0o600), "w") as f:
                json.dump(fake.config(), f, indent=2)
            env = dict(os.environ, SCM_CONFIG_PATH=config, LOG_DIR=os.path.join(work, "logs"),
                       REQUESTS_CA_BUNDLE=fake.write_ca(os.path.join(work, "ca.pem")),
                       NO_PROXY="127.0.0.1,localhost")
            print(f"demo: a stand-in token endpoint at {fake.url}, config {config}\n")
            for attempt in (1, 2):
                print(f"$ ./run-token-cache.sh        # run {attempt}", flush=True)
                result = subprocess.run([os.path.join(root, "run-token-cache.sh")], env=env)
                if result.returncode != 0:
                    print(f"demo: the wrapper exited {result.returncode}")
                    return 1
            print(f"\nthe stand-in saw {len(fake.requests)} token request(s); the log reads:")
            for name in sorted(os.listdir(env["LOG_DIR"])):
                with open(os.path.join(env["LOG_DIR"], name)) as f:
                    print(f"--- {name}\n{f.read()}", end="")
    finally:
        fake.stop()
    print("demo: done, temporary files removed")
    return 0


if __name__ == "__main__":
    if sys.argv[1:] != ["--demo"]:
        sys.exit("usage: python tests/fake_scm.py --demo")
    sys.exit(demo())
