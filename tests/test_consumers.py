"""What consumers use: status, token, run --json / --quiet, and get_token()."""
from __future__ import annotations

import json
import sys

import pytest
from conftest import assert_no_secrets, read_json, write_config
from fake_scm import Answer
from test_run import CACHED, with_token

import scm_token_cache as stc

STATUS_KEYS = {"config": str, "has_token": bool, "expires_at": (str, type(None)), "seconds_left": (int, type(None)),
               "refresh_due": bool}


@pytest.mark.parametrize("expires_in, code, due", [(3600, 0, False), (200, 1, True), (-10, 1, True)])
def test_status_reports_without_requesting_or_writing(cli, fake, tmp_path, expires_in, code, due):
    config = with_token(fake, tmp_path, expires_in)
    before = config.read_bytes()
    result = cli("status", "--config", config).expect(code)
    assert f"config: {config}\n" in result.out
    assert "expires at: " in result.out and " +0000 UTC" in result.out
    assert f"refresh due: {'yes' if due else 'no'} (buffer 300s)" in result.out
    assert ("(expired)" in result.out) == (expires_in < 0)
    assert fake.requests == []
    assert config.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scm-auth.json"]  # not even a lock file
    assert_no_secrets(fake, result.out, result.err, extra=["eyJcached.old.token"])


def test_status_json_has_exactly_the_documented_keys(cli, fake, tmp_path):
    config = with_token(fake, tmp_path, 3600)
    document = json.loads(cli("status", "--json", "--config", config).expect(0).out)
    assert set(document) == set(STATUS_KEYS)
    for key, kind in STATUS_KEYS.items():
        assert isinstance(document[key], kind), key
    assert document["config"] == str(config)
    assert document["has_token"] is True and document["refresh_due"] is False
    assert 3590 <= document["seconds_left"] <= 3600
    assert document["expires_at"] == read_json(config)["jwt_expires_at"]


def test_status_without_a_token(cli, fake, config):
    document = json.loads(cli("status", "--json", "--config", config).expect(1).out)
    assert document == {"config": str(config), "has_token": False, "expires_at": None, "seconds_left": None,
                        "refresh_due": True}
    assert "token: none" in cli("status", "--config", config).expect(1).out


def test_status_buffer_option(cli, fake, tmp_path):
    config = with_token(fake, tmp_path, 200)
    cli("status", "--config", config, "--buffer", "100").expect(0)
    cli("status", "--config", config, "--buffer", "250").expect(1)


def test_status_config_error_is_exit_2(cli, tmp_path):
    config = write_config(tmp_path / "c.json", "{")
    result = cli("status", "--json", "--config", config).expect(2)
    assert result.out == "" and "not valid JSON" in result.err


def test_token_prints_exactly_the_token(cli, fake, config):
    result = cli("token", "--config", config).expect(0)
    assert result.out == fake.issued[0] + "\n"
    assert result.err == ""
    assert read_json(config)["jwt"] == fake.issued[0]
    again = cli("token", "--config", config).expect(0)
    assert again.out == result.out
    assert len(fake.requests) == 1


def test_token_refreshes_a_token_that_is_due(cli, fake, tmp_path):
    config = with_token(fake, tmp_path, 100)
    assert cli("token", "--config", config).expect(0).out == fake.issued[0] + "\n"


@pytest.mark.parametrize("setup, code", [
    ("refused", 1),
    ("bad config", 2),
    ("missing", 2),
])
def test_token_failure_leaves_stdout_empty(cli, fake, tmp_path, setup, code):
    config = write_config(tmp_path / "c.json", fake.config(jwt="eyJold.expired", jwt_expires_at="2000-01-01T00:00:00Z"))
    if setup == "refused":
        fake.answers.append(Answer(status=401, body={"error": "invalid_client"}))
    elif setup == "bad config":
        write_config(config, "[]")
    else:
        config.unlink()
    result = cli("token", "--config", config).expect(code)
    assert result.out == ""
    assert result.err.count("\n") == 1 and "Traceback" not in result.err
    assert "eyJold.expired" not in result.err


def test_run_json_refreshed_then_cached(cli, fake, config):
    first = json.loads(cli("run", "--json", "--config", config).expect(0).out)
    assert set(first) == {"action", "expires_at", "seconds_left"}
    assert first["action"] == "refreshed"
    assert first["expires_at"] == read_json(config)["jwt_expires_at"]
    assert isinstance(first["seconds_left"], int) and 890 <= first["seconds_left"] <= 899
    second = json.loads(cli("run", "--json", "--config", config).expect(0).out)
    assert second["action"] == "cached" and second["expires_at"] == first["expires_at"]


def test_run_json_failure(cli, fake, config):
    fake.answers.append(Answer(status=401, body={"error": "invalid_client", "error_description": "nope"}))
    result = cli("run", "--json", "--config", config).expect(1)
    document = json.loads(result.out)
    assert set(document) == {"action", "error"} and document["action"] == "failed"
    assert "invalid_client - nope" in document["error"]
    assert_no_secrets(fake, result.out, result.err)


def test_run_json_config_error_is_exit_2(cli, tmp_path):
    config = write_config(tmp_path / "c.json", {"client_id": "x"})
    document = json.loads(cli("run", "--json", "--config", config).expect(2).out)
    assert document["action"] == "failed" and "'client_secret' is missing" in document["error"]


def test_quiet_prints_nothing_on_success_but_reports_failure(cli, fake, config):
    result = cli("run", "--quiet", "--config", config).expect(0)
    assert (result.out, result.err) == ("", "")
    assert read_json(config)["jwt"] == fake.issued[0]
    assert cli("run", "--quiet", "--config", config).expect(0).out == ""
    fake.answers.append(Answer(status=403, body={"error": "access_denied"}))
    failed = cli("run", "--quiet", "--force", "--config", config).expect(1)
    assert failed.out == "" and "Failed to refresh JWT: " in failed.err and "403" in failed.err


@pytest.fixture
def trust_fake(fake, monkeypatch):
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", fake.ca_file)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.delenv("SCM_CONFIG_PATH", raising=False)


def test_get_token_twice_makes_one_request(fake, config, trust_fake):
    first = stc.get_token(str(config))
    assert first == fake.issued[0] == read_json(config)["jwt"]
    assert stc.get_token(str(config)) == first
    assert len(fake.requests) == 1


def test_get_token_reads_the_environment_path(fake, config, trust_fake, monkeypatch):
    monkeypatch.setenv("SCM_CONFIG_PATH", str(config))
    assert stc.get_token() == fake.issued[0]


def test_get_token_buffer(fake, tmp_path, trust_fake):
    config = with_token(fake, tmp_path, 200)
    assert stc.get_token(str(config), buffer=100) == "eyJcached.old.token"
    assert stc.get_token(str(config), buffer=300) == fake.issued[0]


def test_get_token_raises_config_error(tmp_path, trust_fake):
    with pytest.raises(stc.ConfigError) as raised:
        stc.get_token(str(tmp_path / "missing.json"))
    assert isinstance(raised.value, stc.TokenCacheError) and raised.value.exit_code == 2
    assert "not found" in str(raised.value)


def test_get_token_raises_refresh_error_without_secrets(fake, config, trust_fake):
    fake.answers.append(Answer(status=400, body={"error": "invalid_request",
                                                 "error_description": f"bad secret {fake.client_secret}"}))
    with pytest.raises(stc.RefreshError) as raised:
        stc.get_token(str(config))
    assert raised.value.exit_code == 1
    assert "bad secret [redacted]" in str(raised.value)
    assert fake.client_secret not in str(raised.value)


def test_cached_run_line_and_token_agree(cli, fake, config):
    token = cli("token", "--config", config).expect(0).out.strip()
    assert CACHED.match(cli("run", "--config", config).expect(0).out.strip())
    assert read_json(config)["jwt"] == token


def test_token_falls_back_to_an_unexpired_cached_token_when_refresh_fails(cli, fake, tmp_path):
    config = with_token(fake, tmp_path, 120)  # due under the 300 s buffer, but still valid
    fake.answers.append(Answer(status=503))
    before = config.read_bytes()
    result = cli("token", "--config", config, "--max-retry-time", "0").expect(0)
    assert result.out == "eyJcached.old.token\n"
    assert "warning: could not refresh the token: " in result.err and "stays valid until" in result.err
    assert config.read_bytes() == before


def test_run_still_fails_loudly_when_only_the_cached_token_is_left(cli, fake, tmp_path):
    config = with_token(fake, tmp_path, 120)
    fake.answers.append(Answer(status=503))
    result = cli("run", "--config", config, "--max-retry-time", "0").expect(1)
    assert "answered 503" in result.err and "the cached token stays valid until " in result.err
    assert "eyJcached.old.token" not in result.out + result.err


def test_get_token_falls_back_but_not_to_an_expired_token(fake, tmp_path, trust_fake):
    config = with_token(fake, tmp_path, 120)
    fake.answers.append(Answer(status=401, body={"error": "invalid_client"}))
    assert stc.get_token(str(config)) == "eyJcached.old.token"
    expired = with_token(fake, tmp_path, -1)
    fake.answers.append(Answer(status=401, body={"error": "invalid_client"}))
    with pytest.raises(stc.RefreshError) as raised:
        stc.get_token(str(expired))
    assert raised.value.cached is None


@pytest.mark.parametrize("command", ["run", "token", "status"])
def test_cached_path_imports_nothing_heavy(cli, fake, tmp_path, command):
    config = with_token(fake, tmp_path, 3600)
    result = cli("-X", "importtime", str(stc.__file__), command, "--config", config, executable=sys.executable)
    result.expect(0)
    imported = {line.split("|")[-1].strip() for line in result.err.splitlines() if line.startswith("import time:")}
    assert "json" in imported  # the probe works
    assert not {"requests", "urllib3", "dateutil", "dateutil.parser", "ssl", "typing"} & imported
