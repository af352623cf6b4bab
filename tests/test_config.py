"""Bad config files: exit 2, one clear sentence naming the file and key, the file byte-for-byte unchanged."""
from __future__ import annotations

import json

import pytest
from conftest import TOOL, write_config

GOOD = {"client_id": "sa@123.iam.panserviceaccount.com", "client_secret": "s3cr3t-value", "scope": "tsg_id:123"}


def check_rejected(cli, path, *words):
    before = path.read_bytes()
    result = cli("run", "--config", path).expect(2)
    assert result.out == ""
    assert result.err.startswith("error: config file ") and result.err.count("\n") == 1, result
    assert "Traceback" not in result.err
    for word in words:
        assert word in result.err
    assert path.read_bytes() == before
    assert "s3cr3t-value" not in result.err
    return result


@pytest.mark.parametrize("text, words", [
    ("", ["not valid JSON", "line 1 column 1"]),
    ('{"client_id": "a",\n  "client_secret": }', ["not valid JSON", "line 2 column 20"]),
    ("[1, 2]", ["must hold a JSON object", "an array"]),
    ('"just a string"', ["a string"]),
    ("42", ["a number"]),
    ("null", ["null"]),
    ('{"client_id": NaN}', ["NaN is not allowed"]),
    ('{"padding": 1e400}', ["too large"]),
    ("[" * 100000, ["not valid JSON"]),
])
def test_unparseable_or_wrong_shape(cli, tmp_path, text, words):
    check_rejected(cli, write_config(tmp_path / "c.json", text), *words)


def test_not_utf8(cli, tmp_path):
    check_rejected(cli, write_config(tmp_path / "c.json", b'{"client_id": "\xff"}'), "not UTF-8")


@pytest.mark.parametrize("key", ["client_id", "client_secret", "scope"])
@pytest.mark.parametrize("value, state", [(None, "missing"), ("", "not a non-empty string"),
                                          ("  ", "not a non-empty string"), (123, "not a non-empty string"),
                                          (["x"], "not a non-empty string")])
def test_required_keys(cli, tmp_path, key, value, state):
    document = {k: v for k, v in GOOD.items() if k != key or value is not None}
    if value is not None:
        document[key] = value
    check_rejected(cli, write_config(tmp_path / "c.json", document), f"'{key}' is {state}")


@pytest.mark.parametrize("url", [
    "http://auth.apps.paloaltonetworks.com/oauth2/access_token",
    "http://127.example.com/token",  # a name, not a loopback address
    "http://localhost.example.com/token",
    "http://[::2]/token",
    "ftp://127.0.0.1/token",
    "auth.apps.paloaltonetworks.com/oauth2/access_token",
    "https://",
    "https://host:notaport/x",
    "",
    42,
])
def test_auth_url_must_be_https_except_loopback(cli, tmp_path, url):
    check_rejected(cli, write_config(tmp_path / "c.json", {**GOOD, "auth_url": url}), "'auth_url'")


def test_auth_url_credentials_are_not_echoed(cli, tmp_path):
    path = write_config(tmp_path / "c.json", {**GOOD, "auth_url": "http://user:hunter2@example.com/t?key=abc"})
    result = check_rejected(cli, path, "http://example.com/t")
    assert "hunter2" not in result.err and "abc" not in result.err


@pytest.mark.parametrize("headers", [["x"], {"X-A": 1}, {"X-A": "a\r\nInjected: yes"}, {"Bad Name": "v"},
                                     {"": "v"}, {"X-A": "snowman \u2603"}])
def test_headers_must_be_sendable(cli, tmp_path, headers):
    check_rejected(cli, write_config(tmp_path / "c.json", {**GOOD, "headers": headers}), "'headers'")


def test_skip_verify_must_be_boolean(cli, tmp_path):
    check_rejected(cli, write_config(tmp_path / "c.json", {**GOOD, "skip_verify_certificate": "yes"}),
                   "'skip_verify_certificate'")


def test_missing_file_says_what_to_create(cli, tmp_path):
    path = tmp_path / "nowhere" / "scm-auth.json"
    result = cli("run", "--config", path).expect(2)
    example = TOOL.parent / "secrets.example" / "scm-auth.json"
    assert result.err == (f"error: config file {path} not found; create it with: install -m 600 -D {example} {path} "
                          "and fill in client_id, client_secret and scope\n")
    assert not path.parent.exists()


def test_directory_as_config(cli, tmp_path):
    result = cli("run", "--config", tmp_path).expect(2)
    assert f"cannot read config file {tmp_path}" in result.err


@pytest.mark.parametrize("args", [
    ["--buffer", "-1"], ["--buffer", "soon"], ["--timeout", "nan"], ["--timeout", "0"], ["--max-retry-time", "-5"],
    ["--lock-timeout", "inf"], ["--json", "--quiet"], ["--no-such-option"],
])
def test_usage_errors_exit_2(cli, tmp_path, args):
    path = write_config(tmp_path / "c.json", GOOD)
    before = path.read_bytes()
    result = cli("run", "--config", path, *args).expect(2)
    assert "usage:" in result.err and "Traceback" not in result.err
    assert path.read_bytes() == before


def test_unknown_command_is_a_usage_error(cli):
    assert "invalid choice" in cli("refresh").expect(2).err


@pytest.mark.parametrize("host", ["127.0.0.1", "127.1.2.3", "[::1]", "localhost"])
def test_http_is_accepted_for_loopback_hosts(cli, tmp_path, host):
    path = write_config(tmp_path / "c.json", {**GOOD, "auth_url": f"http://{host}:9/token"})
    result = cli("run", "--config", path, "--max-retry-time", "0").expect(1)  # accepted, then nobody answers
    assert "could not reach token endpoint" in result.err


def test_valid_config_with_unknown_keys_is_kept_as_is(cli, fake, tmp_path):
    document = {**fake.config(), "port": 443, "logging": "quiet", "tenant": {"name": "x"}}
    path = write_config(tmp_path / "c.json", document)
    cli("run", "--config", path).expect(0)
    written = json.loads(path.read_text())
    assert {k: written[k] for k in document} == document
