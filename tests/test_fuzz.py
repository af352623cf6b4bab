"""Fuzzing main() in-process: any config, any token-endpoint answer.

Whatever comes in, the exit code is 0, 1 or 2, nothing escapes main() (a
traceback), the file is unchanged unless the run succeeded, and no secret is
printed.
"""
from __future__ import annotations

import contextlib
import io
import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import scm_token_cache as stc
from fake_scm import Answer

OLD_TOKEN = "eyJfuzz.old-token.0123456789"
FUZZ = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)
config_keys = st.sampled_from(["client_id", "client_secret", "scope", "auth_url", "headers",
                               "skip_verify_certificate", "jwt", "jwt_expires_at", "jwt_lifetime", "host"])


@pytest.fixture
def trusting(fake, monkeypatch):
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", fake.ca_file)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    return fake


def run_main(*args: str) -> tuple[int, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = stc.main(list(args))
    return code, out.getvalue() + err.getvalue()


def check_run(path, fake, before: bytes, secrets: list[str]) -> int:
    code, output = run_main("run", "--config", str(path), "--max-retry-time", "0", "--lock-timeout", "5")
    assert code in (0, 1, 2)
    if code != 0:
        assert path.read_bytes() == before
    else:
        assert isinstance(json.loads(path.read_text())["jwt"], str)
    for secret in secrets:
        assert secret not in output
    return code


def never_the_real_endpoint(document, fake):
    """Random documents fall back to the default auth_url: point them at the fake instead."""
    if isinstance(document, dict) and "auth_url" not in document:
        document["auth_url"] = fake.url
    return document


@FUZZ
@given(document=json_values)
def test_any_json_document(trusting, tmp_path, document):
    path = tmp_path / "scm-auth.json"
    path.write_text(json.dumps(never_the_real_endpoint(document, trusting)))
    path.chmod(0o600)
    check_run(path, trusting, path.read_bytes(), [])


@FUZZ
@given(overrides=st.dictionaries(config_keys, json_values, max_size=4))
def test_nearly_valid_configs(trusting, tmp_path, overrides):
    document = {**trusting.config(jwt=OLD_TOKEN), **overrides}
    if document.get("skip_verify_certificate") is True or not isinstance(document.get("auth_url"), str):
        document["auth_url"] = trusting.url
    path = tmp_path / "scm-auth.json"
    path.write_text(json.dumps(never_the_real_endpoint(document, trusting)))
    path.chmod(0o600)
    secrets = [s for s in (document.get("client_secret"), document.get("jwt")) if isinstance(s, str) and len(s) > 3]
    check_run(path, trusting, path.read_bytes(), [*secrets, *trusting.issued])


@FUZZ
@given(raw=st.binary(max_size=300))
def test_any_bytes(trusting, tmp_path, raw):
    path = tmp_path / "scm-auth.json"
    path.write_bytes(raw)
    path.chmod(0o600)
    assert check_run(path, trusting, raw, []) == 2 or raw.strip().startswith(b"{")


header_text = st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=20)
token_bodies = st.fixed_dictionaries({}, optional={
    "access_token": json_values | st.text(min_size=1), "expires_in": json_values | st.integers(-5, 10**6),
    "error": json_values, "error_description": json_values | st.just(OLD_TOKEN)})
answers = st.builds(
    Answer,
    status=st.sampled_from([200, 201, 204, 301, 302, 400, 401, 403, 404, 429, 500, 502, 503]) | st.integers(100, 599),
    body=token_bodies | json_values | st.binary(max_size=200),
    headers=st.dictionaries(st.sampled_from(["Retry-After", "Location", "Content-Type", "X-Other"]), header_text,
                            max_size=3),
    cut=st.booleans(),
)


@FUZZ
@given(answer=answers)
def test_any_token_endpoint_answer(trusting, tmp_path, answer):
    if answer.status < 200 or answer.status in (204, 304):
        answer.status = 200 if answer.status < 200 else 500  # bodiless statuses would desync the fake's framing
    if answer.body is None:
        answer.body = {}
    trusting.reset()
    trusting.answers.append(answer)
    path = tmp_path / "scm-auth.json"
    path.write_text(json.dumps(trusting.config(jwt=OLD_TOKEN, jwt_expires_at="2000-01-01T00:00:00Z")))
    path.chmod(0o600)
    secrets = [trusting.client_secret, OLD_TOKEN]
    if 200 <= answer.status < 300 and isinstance(answer.body, dict) \
            and isinstance(answer.body.get("access_token"), str) and len(answer.body["access_token"]) > 3:
        secrets.append(answer.body["access_token"])
    code = check_run(path, trusting, path.read_bytes(), secrets)
    assert len(trusting.requests) == 1
    if code == 0:
        assert json.loads(path.read_text())["jwt"] == answer.body["access_token"]
