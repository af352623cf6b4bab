"""Faults: kills mid-write, crash points, a full disk, flaky networks, load, and a redaction sweep."""
from __future__ import annotations

import errno
import json
import os
import random
import subprocess
import sys
import time

import pytest
from conftest import TOOL, WRAPPER, assert_no_secrets, read_json, write_config
from fake_scm import Answer

import scm_token_cache as stc

IS_ROOT = os.geteuid() == 0


def temp_files(directory):
    return sorted(name for name in os.listdir(directory) if name.endswith(".tmp"))


# --- SIGKILL at random moments ------------------------------------------------------


def test_sigkill_during_refreshes_never_corrupts_the_file(fake, env, tmp_path):
    # Several MB of extra keys make the write take long enough to be hit.
    padding = {f"extra_{i}": "x" * 1000 for i in range(4000)}
    config = write_config(tmp_path / "scm-auth.json", {**fake.config(), **padding}, mode=0o640)
    command = [sys.executable, str(TOOL), "run", "--force", "--config", str(config)]
    started = time.monotonic()
    subprocess.run(command, env=env, check=True, capture_output=True)
    full_run = time.monotonic() - started
    rng = random.Random(1234)
    kills = mid_write = 0
    for attempt in range(12):
        process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if attempt % 2:
            time.sleep(rng.uniform(0.3, 1.0) * full_run)  # anywhere in the run
        else:
            while not temp_files(tmp_path) and process.poll() is None:  # aim at the write itself
                time.sleep(0.001)
            time.sleep(rng.uniform(0, 0.002))
        process.kill()
        kills += process.wait() == -9
        mid_write += bool(temp_files(tmp_path))
        document = read_json(config)  # parses: never half written
        assert document["jwt"] in fake.issued  # the old or the new token, never a mix
        assert document["jwt_lifetime"] == 899 and stc.parse_time(document["jwt_expires_at"]) is not None
        assert {k: document[k] for k in padding} == padding
        assert config.stat().st_mode & 0o777 == 0o640
        # The next run succeeds and clears what the killed one left.
        subprocess.run(command, env=env, check=True, capture_output=True)
        assert temp_files(tmp_path) == []
    assert kills >= 6  # most kills landed while the tool was still running
    assert mid_write >= 2  # and some in the middle of writing the temp file


# --- a failure at each step of the atomic write ---------------------------------------


def failing(exception):
    def fail(*args, **kwargs):
        raise exception

    return fail


@pytest.mark.parametrize("target, error", [
    ("tempfile.mkstemp", OSError(errno.EACCES, "Permission denied")),  # creating the temp file
    ("os.fchmod", OSError(errno.EPERM, "Operation not permitted")),  # right after the temp file exists
    ("os.fsync", OSError(errno.EIO, "Input/output error")),  # after the write
    ("os.replace", OSError(errno.EBUSY, "Device or resource busy")),  # after fsync, at the rename
    ("os.replace", KeyboardInterrupt()),  # interrupted at the rename
])
def test_crash_at_each_step_keeps_the_original(tmp_path, monkeypatch, target, error):
    import tempfile

    path = write_config(tmp_path / "scm-auth.json", '{"client_id": "original"}\n', mode=0o640)
    before = path.read_bytes()
    module = tempfile if target.startswith("tempfile") else os
    monkeypatch.setattr(module, target.split(".")[1], failing(error))
    with pytest.raises(type(error) if isinstance(error, KeyboardInterrupt) else stc.RefreshError) as raised:
        stc.write_atomically(str(path), b'{"client_id": "new"}\n')
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["scm-auth.json"]
    assert path.stat().st_mode & 0o777 == 0o640
    if isinstance(error, OSError):
        assert "the file was left unchanged" in str(raised.value)


def test_directory_fsync_failure_after_the_rename_is_harmless(tmp_path, monkeypatch):
    path = write_config(tmp_path / "scm-auth.json", '{"client_id": "original"}\n', mode=0o600)
    real_fsync, calls = os.fsync, []

    def fsync(fd):
        calls.append(fd)
        if len(calls) == 2:  # the directory's
            raise OSError(errno.EINVAL, "Invalid argument")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    stc.write_atomically(str(path), b'{"client_id": "new"}\n')
    assert len(calls) == 2
    assert path.read_bytes() == b'{"client_id": "new"}\n'
    assert sorted(os.listdir(tmp_path)) == ["scm-auth.json"]


# --- disk full --------------------------------------------------------------------------


@pytest.fixture
def tiny_tmpfs(tmp_path):
    mount_point = tmp_path / "tiny"
    mount_point.mkdir()
    if not IS_ROOT:
        pytest.skip("mounting a tmpfs needs root")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount_point)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"mounting a tmpfs is not allowed here: {mounted.stderr.strip()}")
    yield mount_point
    subprocess.run(["umount", str(mount_point)], check=True)


def test_disk_full_keeps_the_original(cli, fake, tiny_tmpfs):
    config = write_config(tiny_tmpfs / "scm-auth.json", {**fake.config(), "padding": "p" * 40_000})
    before = config.read_bytes()
    result = cli("run", "--config", config).expect(1)
    assert "no space left on the device" in result.err and "the file was left unchanged" in result.err
    assert "Traceback" not in result.err
    assert config.read_bytes() == before
    assert temp_files(tiny_tmpfs) == []
    assert_no_secrets(fake, result.out, result.err)


# --- flaky networks ------------------------------------------------------------------------


@pytest.mark.parametrize("faults", [
    [Answer(hang_up=True)],
    [Answer(cut=True)],
    [Answer(status=500), Answer(status=502), Answer(status=503)],
    [Answer(status=429)],
    [Answer(status=429, headers={"Retry-After": "1"}), Answer(status=503, headers={"Retry-After": "0"})],
    [Answer(delay=2)],  # beyond --timeout 1
    [Answer(cut=True), Answer(hang_up=True), Answer(status=503)],
], ids=["reset", "cut-body", "5xx-burst", "429", "retry-after", "timeout", "mixed"])
def test_transient_faults_are_recovered_within_the_budget(cli, fake, config, faults):
    fake.answers.extend(faults)
    result = cli("run", "--config", config, "--timeout", "1", "--max-retry-time", "30").expect(0)
    assert len(fake.requests) == len(faults) + 1
    # Cut or late answers may issue tokens too (a timed-out request can even finish after its retry).
    assert read_json(config)["jwt"] in fake.issued
    assert result.out.splitlines()[-1].startswith("Token refreshed")


@pytest.mark.parametrize("status", [400, 401, 403, 404, 405])
def test_permanent_refusals_are_not_retried(cli, fake, config, status):
    fake.answers.extend([Answer(status=status, body={"error": "nope"})] * 3)
    before = config.read_bytes()
    cli("run", "--config", config, "--max-retry-time", "30").expect(1)
    assert len(fake.requests) == 1
    assert config.read_bytes() == before


# --- load -----------------------------------------------------------------------------------


def test_thirty_concurrent_runs_and_tokens_make_one_request(fake, env, tmp_path):
    config = write_config(tmp_path / "scm-auth.json",
                          fake.config(jwt="eyJexpired.old", jwt_expires_at="2000-01-01T00:00:00Z"))
    fake.delay = 2.0
    commands = ["run" if i % 2 else "token" for i in range(30)]
    processes = [subprocess.Popen([sys.executable, str(TOOL), command, "--config", str(config)], env=env,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for command in commands]
    results = [(p.wait(120), *p.communicate()) for p in processes]
    assert [code for code, _, _ in results] == [0] * 30, results
    assert len(fake.requests) == 1
    (token,) = fake.issued
    assert {out for command, (_, out, _) in zip(commands, results) if command == "token"} == {token + "\n"}
    assert read_json(config)["jwt"] == token


# --- redaction sweep --------------------------------------------------------------------------

OLD_TOKEN = "eyJSENTINEL.old-token.9f8e7d6c5b4a"


def echo_everything(fake):
    """An error body that repeats every secret the endpoint knows."""
    return {"error": f"invalid_client {fake.client_secret}", "error_description": f"token {OLD_TOKEN} rejected"}


FAILURES = {
    "401 echoing secrets": lambda fake: [Answer(status=401, body=echo_everything(fake))],
    "400 echoing secrets": lambda fake: [Answer(status=400, body=echo_everything(fake))],
    "500s echoing secrets": lambda fake: [Answer(status=500, body=echo_everything(fake))] * 5,
    "429 echoing secrets": lambda fake: [Answer(status=429, body=echo_everything(fake),
                                                headers={"Retry-After": "999"})],
    "redirect carrying the secret": lambda fake: [Answer(status=302, body="",
                                                         headers={"Location": f"https://x.example/?s={fake.client_secret}"})],
    "2xx with a token but a bad lifetime": lambda fake: [Answer(status=200, body={"access_token": "eyJNEW.sentinel.tok",
                                                                              "expires_in": -1})],
    "2xx echoing the secret as text": lambda fake: [Answer(status=200, body=f"secret={fake.client_secret}")],
    "cut body": lambda fake: [Answer(cut=True)] * 5,
    "hang up": lambda fake: [Answer(hang_up=True)] * 5,
}


@pytest.mark.parametrize("failure", FAILURES)
def test_no_secret_reaches_output_or_log(fake, env, tmp_path, failure):
    config = write_config(tmp_path / "scm-auth.json",
                          fake.config(jwt=OLD_TOKEN, jwt_expires_at="2000-01-01T00:00:00Z"), mode=0o644)
    fake.answers.extend(FAILURES[failure](fake))
    logs = tmp_path / "logs"
    result = subprocess.run([str(WRAPPER), "run", "--config", str(config), "--max-retry-time", "1"],
                            env={**env, "LOG_DIR": str(logs)}, capture_output=True, text=True)
    assert result.returncode == 1
    log = "".join(path.read_text() for path in logs.iterdir())
    assert "Failed to refresh JWT" in log
    assert_no_secrets(fake, result.stdout, result.stderr, log, extra=[OLD_TOKEN, "eyJNEW.sentinel.tok"])
    for command in (["run", "--json", "--max-retry-time", "0"], ["token", "--max-retry-time", "0"], ["status"]):
        fake.reset()
        fake.answers.extend(FAILURES[failure](fake))
        direct = subprocess.run([sys.executable, str(TOOL), *command, "--config", str(config)], env=env,
                                capture_output=True, text=True)
        assert direct.returncode == 1
        assert_no_secrets(fake, direct.stdout, direct.stderr, extra=[OLD_TOKEN, "eyJNEW.sentinel.tok"])


def test_no_secret_in_config_errors_or_lock_timeouts(cli, fake, tmp_path):
    secret = fake.client_secret
    bad = write_config(tmp_path / "bad.json", {**fake.config(), "scope": 7, "jwt": OLD_TOKEN})
    outputs = [cli("run", "--config", bad).expect(2)]
    good = write_config(tmp_path / "good.json", fake.config(jwt=OLD_TOKEN))
    holder = subprocess.Popen(["flock", f"{good}.lock", "sleep", "30"])
    try:
        time.sleep(0.3)
        outputs.append(cli("run", "--config", good, "--lock-timeout", "0.5").expect(1))
    finally:
        holder.kill()
        holder.wait()
    for result in outputs:
        assert secret not in result.out + result.err and OLD_TOKEN not in result.out + result.err


def test_token_object_and_errors_never_show_secrets(fake, config, monkeypatch):
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", fake.ca_file)
    token = stc.ensure_token(str(config))
    assert token.value not in repr(token) and token.value not in str(token)
    assert json.loads(config.read_text())["jwt"] == token.value
