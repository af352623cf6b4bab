"""`run` end to end: the real CLI in a subprocess against the strict HTTPS stand-in."""
from __future__ import annotations

import base64
import datetime
import json
import os
import re
import sys
from urllib.parse import parse_qs

import pytest
from conftest import TOOL, assert_no_secrets, read_json, write_config
from fake_scm import LEGACY_TOKEN_PATH, Answer

REFRESHED = re.compile(r"^Token refreshed, expires at: (\d{4}-\d\d-\d\d \d\d:\d\d:\d\d) \+0000 UTC$")
CACHED = re.compile(r"^Using cached token, expires at: (\d{4}-\d\d-\d\d \d\d:\d\d:\d\d) \+0000 UTC$")


def utc(offset_seconds: float = 0) -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(seconds=offset_seconds)


def rfc3339(moment: datetime.datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def with_token(fake, tmp_path, expires_in: float, token: str = "eyJcached.old.token", **extra):
    document = fake.config(jwt=token, jwt_expires_at=rfc3339(utc(expires_in)), jwt_lifetime=899, **extra)
    return write_config(tmp_path / "scm-auth.json", document)


def test_first_run_fetches_and_writes_the_token(cli, fake, config):
    before = utc().replace(microsecond=0)
    result = cli("run", "--config", config).expect(0)
    after = utc()

    lines = result.out.splitlines()
    assert lines[0] == "Token expired or missing, fetching new token..."
    assert REFRESHED.match(lines[1]) and len(lines) == 2
    assert result.err == ""
    written = read_json(config)
    assert list(written) == ["client_id", "client_secret", "scope", "auth_url", "host", "jwt", "jwt_expires_at",
                             "jwt_lifetime"]
    assert written["jwt"] == fake.issued[0]
    assert written["jwt_lifetime"] == 899
    expires_at = datetime.datetime.strptime(written["jwt_expires_at"], "%Y-%m-%dT%H:%M:%SZ").replace(
        tzinfo=datetime.timezone.utc)
    assert before + datetime.timedelta(seconds=899) <= expires_at <= after + datetime.timedelta(seconds=899)
    assert REFRESHED.match(lines[1]).group(1) == expires_at.strftime("%Y-%m-%d %H:%M:%S")
    assert config.read_bytes().endswith(b"}\n")
    assert_no_secrets(fake, result.out, result.err)


def test_request_is_basic_auth_and_form_encoded(cli, fake, config):
    cli("run", "--config", config).expect(0)
    (request,) = fake.requests
    assert request.method == "POST"
    user, _, password = base64.b64decode(request.headers["authorization"].split()[1]).decode().partition(":")
    assert (user, password) == (fake.client_id, fake.client_secret)
    assert request.headers["content-type"] == "application/x-www-form-urlencoded"
    assert parse_qs(request.body.decode()) == {"grant_type": ["client_credentials"], "scope": [fake.scope]}


def test_second_run_uses_the_cached_token_without_a_request(cli, fake, config):
    cli("run", "--config", config).expect(0)
    content = config.read_bytes()
    result = cli("run", "--config", config).expect(0)
    assert CACHED.match(result.out.strip())
    assert len(fake.requests) == 1
    assert config.read_bytes() == content


def test_no_subcommand_means_run_and_module_form_works(cli, fake, config, env):
    cli("--config", config).expect(0)
    import subprocess

    completed = subprocess.run([sys.executable, "-m", "scm_token_cache", "run", "--config", str(config)],
                               env=env, capture_output=True, text=True, cwd=TOOL.parent)
    assert completed.returncode == 0 and CACHED.match(completed.stdout.strip()), completed


def test_installed_console_script_runs(cli, fake, config):
    script = os.path.join(os.path.dirname(sys.executable), "scm-token-cache")
    if not os.path.exists(script):
        pytest.skip("scm-token-cache is not installed in this interpreter's environment (make test installs it)")
    result = cli("run", "--config", config, executable=script).expect(0)
    assert REFRESHED.match(result.out.splitlines()[-1])


@pytest.mark.parametrize("expires_in, refreshes", [
    (3600, False),
    (302, False),  # a couple of seconds of slack for the subprocess start
    (298, True),
    (-60, True),
])
def test_refreshes_only_within_the_buffer(cli, fake, tmp_path, expires_in, refreshes):
    config = with_token(fake, tmp_path, expires_in)
    result = cli("run", "--config", config).expect(0)
    assert len(fake.requests) == (1 if refreshes else 0)
    assert (read_json(config)["jwt"] != "eyJcached.old.token") == refreshes
    assert (REFRESHED if refreshes else CACHED).match(result.out.splitlines()[-1])


def test_buffer_option_changes_the_decision(cli, fake, tmp_path):
    config = with_token(fake, tmp_path, 600)
    cli("run", "--config", config, "--buffer", "500").expect(0)
    assert fake.requests == []
    cli("run", "--config", config, "--buffer", "700").expect(0)
    assert len(fake.requests) == 1


def test_force_refreshes_a_valid_token(cli, fake, tmp_path):
    config = with_token(fake, tmp_path, 3600)
    result = cli("run", "--config", config, "--force").expect(0)
    assert result.out.splitlines()[0] == "Refresh forced, fetching new token..."
    assert read_json(config)["jwt"] == fake.issued[0]


@pytest.mark.parametrize("stamp", ["not a time", "2026-01-23 12:34:56", "", 12345, None])
def test_unreadable_or_zoneless_expiry_refreshes_with_a_warning(cli, fake, tmp_path, stamp):
    document = fake.config(jwt="eyJcached.old.token", jwt_expires_at=stamp)
    config = write_config(tmp_path / "scm-auth.json", document)
    result = cli("run", "--config", config).expect(0)
    assert "jwt_expires_at is missing or not an RFC 3339 time" in result.err
    assert read_json(config)["jwt"] == fake.issued[0]


@pytest.mark.parametrize("stamp", [
    "{}Z", "{}.123456Z", "{}.5+00:00", "{}+02:00", "{}-05:30",
])
def test_expiry_is_read_leniently(cli, fake, tmp_path, stamp):
    # One hour ahead, written in several RFC 3339 spellings, shifted so that each means the same instant.
    moment = utc(3600)
    offset = {"+02:00": 2, "-05:30": -5.5}.get(stamp[-6:], 0)
    local = (moment + datetime.timedelta(hours=offset)).strftime("%Y-%m-%dT%H:%M:%S")
    document = fake.config(jwt="eyJcached.old.token", jwt_expires_at=stamp.format(local))
    config = write_config(tmp_path / "scm-auth.json", document)
    result = cli("run", "--config", config).expect(0)
    assert CACHED.match(result.out.strip()), result
    assert fake.requests == []


def test_empty_jwt_refreshes(cli, fake, tmp_path):
    config = write_config(tmp_path / "scm-auth.json", fake.config(jwt="", jwt_expires_at=rfc3339(utc(3600))))
    cli("run", "--config", config).expect(0)
    assert len(fake.requests) == 1


def test_keeps_other_keys_values_and_order(cli, fake, tmp_path):
    document = {"zeta": 1, **fake.config(), "nested": {"b": [1, 2.5, None, True], "a": "ünïcode"}, "jwt": "old",
                "jwt_expires_at": "2000-01-01T00:00:00Z", "jwt_lifetime": 1, "alpha": "last"}
    config = write_config(tmp_path / "scm-auth.json", document)
    cli("run", "--config", config).expect(0)
    written = read_json(config)
    assert list(written) == list(document)
    assert {k: v for k, v in written.items() if not k.startswith("jwt")} == \
        {k: v for k, v in document.items() if not k.startswith("jwt")}


def test_legacy_auth_path_works(cli, fake, tmp_path):
    url = fake.url.replace("/auth/v1/oauth2/access_token", LEGACY_TOKEN_PATH)
    config = write_config(tmp_path / "scm-auth.json", {**fake.config(), "auth_url": url})
    cli("run", "--config", config).expect(0)
    assert fake.requests[0].path == LEGACY_TOKEN_PATH


def test_extra_headers_are_sent(cli, fake, tmp_path):
    config = write_config(tmp_path / "scm-auth.json", fake.config(headers={"X-Trace": "abc 123"}))
    cli("run", "--config", config).expect(0)
    assert fake.requests[0].headers["x-trace"] == "abc 123"


def test_config_path_from_environment(cli, fake, config):
    cli("run", extra_env={"SCM_CONFIG_PATH": str(config)}).expect(0)
    assert read_json(config)["jwt"] == fake.issued[0]


def test_default_config_path_is_beside_the_script_not_the_working_directory(tmp_path, env):
    import shutil
    import subprocess

    (tmp_path / "secrets").mkdir()
    copy = tmp_path / "scm_token_cache.py"
    shutil.copy(TOOL, copy)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    completed = subprocess.run([sys.executable, str(copy), "run"], cwd=elsewhere, env=env, capture_output=True,
                               text=True)
    assert completed.returncode == 2
    assert f"config file {tmp_path / 'secrets' / 'scm-auth.json'} not found" in completed.stderr
    assert f"install -m 600 -D {tmp_path / 'secrets.example' / 'scm-auth.json'}" in completed.stderr


def test_symlinked_config_updates_the_target_and_stays_a_link(cli, fake, config, tmp_path):
    link = tmp_path / "link.json"
    link.symlink_to(config)
    cli("run", "--config", link).expect(0)
    assert link.is_symlink() and os.readlink(link) == str(config)
    assert read_json(config)["jwt"] == fake.issued[0]


@pytest.mark.parametrize("mode", [0o600, 0o640, 0o400])
def test_mode_is_kept(cli, fake, tmp_path, mode):
    config = write_config(tmp_path / "scm-auth.json", fake.config(), mode=mode)
    cli("run", "--config", config).expect(0)
    assert config.stat().st_mode & 0o777 == mode
    assert sorted(os.listdir(tmp_path)) == ["logs", "scm-auth.json", "scm-auth.json.lock"] or \
        sorted(os.listdir(tmp_path)) == ["scm-auth.json", "scm-auth.json.lock"]


def test_lock_file_is_private(cli, fake, config):
    cli("run", "--config", config).expect(0)
    assert (config.parent / "scm-auth.json.lock").stat().st_mode & 0o777 == 0o600


def test_group_readable_config_warns_but_runs(cli, fake, tmp_path):
    config = write_config(tmp_path / "scm-auth.json", fake.config(), mode=0o644)
    result = cli("run", "--config", config).expect(0)
    assert f"chmod 600 {config}" in result.err
    assert "warning:" in result.err


def test_skip_verify_certificate_is_honoured_with_a_warning(cli, fake, tmp_path, env):
    import certifi

    config = write_config(tmp_path / "scm-auth.json", fake.config(skip_verify_certificate=True))
    # A bundle without our CA cannot verify the fake; skip_verify_certificate wins over $REQUESTS_CA_BUNDLE.
    result = cli("run", "--config", config, extra_env={"REQUESTS_CA_BUNDLE": certifi.where()}).expect(0)
    assert "skip_verify_certificate is true" in result.err
    assert "InsecureRequestWarning" not in result.err


def test_untrusted_certificate_fails_clearly_without_retrying(cli, fake, config):
    result = cli("run", "--config", config, "--max-retry-time", "60", extra_env={"REQUESTS_CA_BUNDLE": ""})
    result.expect(1)
    assert "gave up after" not in result.err  # failed at once: a certificate problem is not retried
    assert "TLS certificate verification failed" in result.err
    assert "Traceback" not in result.err
    assert fake.requests == []


def test_ssl_cert_file_is_honoured(cli, fake, config, env):
    cli("run", "--config", config, extra_env={"REQUESTS_CA_BUNDLE": "", "SSL_CERT_FILE": env["REQUESTS_CA_BUNDLE"]})\
        .expect(0)


# --- refusals, retries and the time budget ---------------------------------------------


def test_bad_credentials_are_reported_and_not_retried(cli, fake, tmp_path):
    config = write_config(tmp_path / "scm-auth.json", {**fake.config(), "client_secret": "wrong-secret-value"})
    before = config.read_bytes()
    result = cli("run", "--config", config).expect(1)
    assert len(fake.requests) == 1
    assert "answered 401: invalid_client - Client authentication failed" in result.err
    assert "check client_id, client_secret and scope" in result.err
    assert result.err.count("\n") == 1 and "Traceback" not in result.err
    assert config.read_bytes() == before
    assert "wrong-secret-value" not in result.out + result.err


@pytest.mark.parametrize("status", [400, 403])
def test_other_client_errors_are_not_retried(cli, fake, config, status):
    fake.answers.append(Answer(status=status, body={"error": "invalid_scope", "error_description": "no such tsg"}))
    before = config.read_bytes()
    result = cli("run", "--config", config).expect(1)
    assert len(fake.requests) == 1
    assert f"answered {status}: invalid_scope - no such tsg" in result.err
    assert config.read_bytes() == before


def test_wrong_scope_is_refused_by_the_endpoint(cli, fake, tmp_path):
    config = write_config(tmp_path / "scm-auth.json", {**fake.config(), "scope": "tsg_id:999"})
    result = cli("run", "--config", config).expect(1)
    assert "400: invalid_scope" in result.err


def test_server_errors_are_retried_until_success(cli, fake, config):
    fake.answers.extend([Answer(status=503), Answer(status=500, body="oops")])
    result = cli("run", "--config", config, "--max-retry-time", "20").expect(0)
    assert len(fake.requests) == 3
    assert read_json(config)["jwt"] == fake.issued[0]
    assert REFRESHED.match(result.out.splitlines()[-1])


def test_retry_after_is_honoured(cli, fake, config):
    fake.answers.append(Answer(status=429, headers={"Retry-After": "2"}))
    cli("run", "--config", config, "--max-retry-time", "10").expect(0)
    first, second = fake.requests
    assert second.at - first.at >= 1.9


def test_retry_after_beyond_the_budget_gives_up_at_once(cli, fake, config):
    fake.answers.append(Answer(status=503, headers={"Retry-After": "120"}))
    before = config.read_bytes()
    result = cli("run", "--config", config, "--max-retry-time", "5").expect(1)
    assert len(fake.requests) == 1
    assert "answered 503" in result.err and "gave up after 1 attempt" in result.err
    assert config.read_bytes() == before


def test_zero_retry_time_means_one_try(cli, fake, config):
    fake.answers.extend([Answer(status=502)] * 3)
    result = cli("run", "--config", config, "--max-retry-time", "0").expect(1)
    assert len(fake.requests) == 1
    assert "--max-retry-time is 0s" in result.err


def test_retries_stop_within_the_budget(cli, fake, config):
    fake.answers.extend([Answer(status=503)] * 50)
    result = cli("run", "--config", config, "--max-retry-time", "3").expect(1)
    assert 2 <= len(fake.requests) <= 5  # backoff 0.5-1 s, then 1-2 s, then 2-4 s ...
    assert "gave up after" in result.err


def test_timeout_is_retried(cli, fake, config):
    fake.answers.append(Answer(delay=3))
    result = cli("run", "--config", config, "--timeout", "1", "--max-retry-time", "10").expect(0)
    assert len(fake.requests) == 2
    assert REFRESHED.match(result.out.splitlines()[-1])


def test_unreachable_endpoint_fails_clearly(cli, tmp_path, fake):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = write_config(tmp_path / "scm-auth.json",
                          {**fake.config(), "auth_url": f"https://127.0.0.1:{port}/auth/v1/oauth2/access_token"})
    result = cli("run", "--config", config, "--max-retry-time", "0").expect(1)
    assert f"could not reach token endpoint https://127.0.0.1:{port}/auth/v1/oauth2/access_token" in result.err
    assert "connection refused" in result.err


@pytest.mark.parametrize("answer, says", [
    (Answer(body="<html>proxy error</html>"), "body is not JSON"),
    (Answer(body=[1, 2]), "not an object"),
    (Answer(body={"expires_in": 899}), "without an access_token"),
    (Answer(body={"access_token": "", "expires_in": 899}), "without an access_token"),
    (Answer(body={"access_token": "abc", "expires_in": "899"}), "expires_in"),
    (Answer(body={"access_token": "abc", "expires_in": 0}), "expires_in"),
    (Answer(body={"access_token": "abc", "expires_in": 899.5}), "expires_in"),
    (Answer(body={"access_token": "abc", "expires_in": True}), "expires_in"),
    (Answer(body={"access_token": "abc", "expires_in": 10**40}), "expires_in"),
    (Answer(status=302, headers={"Location": "https://elsewhere.example/token"}), "redirect"),
])
def test_bad_responses_fail_and_leave_the_file(cli, fake, config, answer, says):
    answer.status = answer.status if answer.status != 200 else 201
    fake.answers.append(answer)
    before = config.read_bytes()
    result = cli("run", "--config", config).expect(1)
    assert says in result.err
    assert len(fake.requests) == 1
    assert config.read_bytes() == before
    assert "Traceback" not in result.err


def test_http_is_allowed_for_loopback(cli, tmp_path, fake):
    import threading
    from http.server import BaseHTTPRequestHandler, HTTPServer

    class Plain(BaseHTTPRequestHandler):
        def do_POST(self):
            self.rfile.read(int(self.headers["Content-Length"]))
            body = json.dumps({"access_token": "eyJplain.http.token", "expires_in": 899}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", 0), Plain)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://localhost:{server.server_address[1]}/token"
        config = write_config(tmp_path / "scm-auth.json", {**fake.config(), "auth_url": url})
        cli("run", "--config", config).expect(0)
        assert read_json(config)["jwt"] == "eyJplain.http.token"
    finally:
        server.shutdown()
