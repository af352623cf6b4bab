"""Shared fixtures: one strict HTTPS stand-in for the token endpoint, config files, the real CLI."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, os.path.dirname(__file__))
from fake_scm import FakeSCM  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
TOOL = ROOT / "scm_token_cache.py"
WRAPPER = ROOT / "run-token-cache.sh"


@pytest.fixture(scope="session")
def fake_server(tmp_path_factory):
    fake = FakeSCM().start()
    fake.ca_file = fake.write_ca(str(tmp_path_factory.mktemp("ca") / "ca.pem"))
    yield fake
    fake.stop()


@pytest.fixture
def fake(fake_server):
    fake_server.reset()
    yield fake_server
    fake_server.reset()


@pytest.fixture
def env(fake, tmp_path):
    """The environment the CLI runs in: trusts the fake's CA, no proxy, no inherited config path."""
    environment = {k: v for k, v in os.environ.items()
                   if k not in ("SCM_CONFIG_PATH", "SSL_CERT_FILE", "CURL_CA_BUNDLE") and "proxy" not in k.lower()}
    environment.update(REQUESTS_CA_BUNDLE=fake.ca_file, NO_PROXY="127.0.0.1,localhost", PYTHONDONTWRITEBYTECODE="1",
                       LOG_DIR=str(tmp_path / "logs"))
    return environment


def write_config(path: Path, document, mode: int = 0o600) -> Path:
    """Write a config (dict -> pretty JSON, str/bytes as is) with the given mode."""
    if isinstance(document, dict):
        document = json.dumps(document, indent=2) + "\n"
    data = document.encode() if isinstance(document, str) else document
    path.write_bytes(data)
    path.chmod(mode)
    return path


@pytest.fixture
def config(fake, tmp_path):
    """A valid config with no token yet, pointing at the fake."""
    return write_config(tmp_path / "scm-auth.json", fake.config(host="api.sase.paloaltonetworks.com"))


class Result:
    def __init__(self, completed: subprocess.CompletedProcess) -> None:
        self.code = completed.returncode
        self.out = completed.stdout
        self.err = completed.stderr
        self.args = completed.args

    def __repr__(self) -> str:
        return f"exit {self.code}\n--- stdout\n{self.out}--- stderr\n{self.err}"

    def expect(self, code: int) -> Result:
        """Assert the exit code, showing stdout and stderr when it is not what was expected."""
        assert self.code == code, f"{self.args} expected exit {code}, got {self!r}"
        return self


@pytest.fixture
def cli(env):
    """Run the real tool in a subprocess: cli('run', '--config', path) -> Result."""

    def run(*args, extra_env=None, timeout=60, executable=None):
        command = [sys.executable, str(TOOL)] if executable is None else [executable]
        completed = subprocess.run(command + [str(a) for a in args], env={**env, **(extra_env or {})},
                                   capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
        return Result(completed)

    return run


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())


def assert_no_secrets(fake, *texts, extra=()):
    """No client secret and no token (issued or given) appears in any of the texts."""
    for secret in [fake.client_secret, *fake.issued, *extra]:
        for text in texts:
            assert secret not in text, "a secret leaked into the output"
