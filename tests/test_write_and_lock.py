"""Atomic replacement and the lock, through the real CLI."""
from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
from conftest import TOOL, read_json, write_config
from test_run import CACHED, with_token

IS_ROOT = os.geteuid() == 0


@pytest.fixture
def frozen_dir(tmp_path):
    """A directory whose entries cannot be created or renamed: chattr +i as root, chmod otherwise."""
    directory = tmp_path / "frozen"
    directory.mkdir()

    def freeze():
        if IS_ROOT:
            done = subprocess.run(["chattr", "+i", str(directory)], capture_output=True)
            if done.returncode != 0:
                pytest.skip(f"chattr +i is not possible here: {done.stderr.decode().strip()}")
        else:
            directory.chmod(0o500)

    yield directory, freeze
    if IS_ROOT:
        subprocess.run(["chattr", "-i", str(directory)], capture_output=True)
    directory.chmod(0o700)


def test_unwritable_directory_fails_and_keeps_the_original(cli, fake, frozen_dir):
    directory, freeze = frozen_dir
    config = write_config(directory / "scm-auth.json", fake.config())
    (directory / "scm-auth.json.lock").touch(mode=0o600)  # the lock file may exist already
    before = config.read_bytes()
    freeze()
    result = cli("run", "--config", config).expect(1)
    assert f"could not rewrite config file {config}" in result.err
    assert "the file was left unchanged" in result.err
    assert result.err.count("\n") == 1 and "Traceback" not in result.err
    assert config.read_bytes() == before
    assert sorted(os.listdir(directory)) == ["scm-auth.json", "scm-auth.json.lock"]


def test_lock_file_that_cannot_be_created_fails_clearly(cli, fake, frozen_dir):
    directory, freeze = frozen_dir
    config = write_config(directory / "scm-auth.json", fake.config())
    before = config.read_bytes()
    freeze()
    result = cli("run", "--config", config).expect(1)
    assert f"cannot open lock file {config}.lock" in result.err
    assert config.read_bytes() == before
    assert fake.requests == []


@pytest.mark.skipif(not IS_ROOT, reason="bind mounts need root")
def test_single_file_bind_mount_says_mount_the_directory(cli, fake, tmp_path):
    source = write_config(tmp_path / "source.json", fake.config())
    (tmp_path / "mounted").mkdir()
    config = write_config(tmp_path / "mounted" / "scm-auth.json", "placeholder")
    mounted = subprocess.run(["mount", "--bind", str(source), str(config)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"mount --bind is not allowed here: {mounted.stderr.decode().strip()}")
    try:
        before = config.read_bytes()
        result = cli("run", "--config", config).expect(1)
        assert "single-file bind mount" in result.err and "mount its directory instead" in result.err
        assert config.read_bytes() == before
        assert sorted(os.listdir(config.parent)) == ["scm-auth.json", "scm-auth.json.lock"]
    finally:
        subprocess.run(["umount", str(config)])


@pytest.mark.skipif(not IS_ROOT, reason="changing a file's owner needs root")
def test_owner_is_kept_when_root_rewrites(cli, fake, config):
    os.chown(config, 4321, 4321)
    cli("run", "--config", config).expect(0)
    assert (config.stat().st_uid, config.stat().st_gid) == (4321, 4321)


def test_stale_temp_files_are_removed_under_the_lock(cli, fake, config, tmp_path):
    stale = [tmp_path / ".scm-auth.json.k1ll3d.tmp", tmp_path / ".scm-auth.json.x9.tmp"]
    for path in stale:
        path.write_text("half a config")
    unrelated = tmp_path / ".other.json.abc.tmp"
    unrelated.write_text("not ours")
    cli("run", "--config", config).expect(0)
    assert not any(path.exists() for path in stale)
    assert unrelated.exists()


def start_many(env, config, count, command="run"):
    return [subprocess.Popen([sys.executable, str(TOOL), command, "--config", str(config)], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(count)]


def test_simultaneous_runs_make_one_request(fake, config, env):
    fake.delay = 1.0
    processes = start_many(env, config, 10)
    results = [(p.wait(60), *p.communicate()) for p in processes]
    assert [code for code, _, _ in results] == [0] * 10, results
    assert len(fake.requests) == 1
    assert sum("Token refreshed" in out for _, out, _ in results) == 1
    assert sum("Using cached token" in out for _, out, _ in results) == 9
    assert read_json(config)["jwt"] == fake.issued[0]


def hold_lock(path, seconds):
    """Hold the lock the way an operator's shell would: flock(1) on <config>.lock."""
    holder = subprocess.Popen(["flock", f"{path}.lock", "sh", "-c", f"echo locked; sleep {seconds}"],
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    return holder


def test_lock_timeout_names_the_lock_file(cli, fake, config):
    holder = hold_lock(config, 30)
    try:
        before = config.read_bytes()
        started = time.monotonic()
        result = cli("run", "--config", config, "--lock-timeout", "1").expect(1)
        assert time.monotonic() - started < 10
        assert f"{config}.lock" in result.err and "--lock-timeout" in result.err
        assert config.read_bytes() == before
        assert fake.requests == []
    finally:
        holder.kill()
        holder.wait()


def test_waits_for_a_shell_holding_the_lock(cli, fake, config):
    holder = hold_lock(config, 1)
    result = cli("run", "--config", config, "--lock-timeout", "20").expect(0)
    holder.wait()
    assert "Token refreshed" in result.out
    assert len(fake.requests) == 1


def test_cached_path_does_not_wait_for_the_lock(cli, fake, tmp_path):
    config = with_token(fake, tmp_path, 3600)
    holder = hold_lock(config, 30)
    try:
        result = cli("run", "--config", config, "--lock-timeout", "0").expect(0)
        assert CACHED.match(result.out.strip())
    finally:
        holder.kill()
        holder.wait()
