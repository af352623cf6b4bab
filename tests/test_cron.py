"""The cron wrapper and crontab installation, run for real in cron's bare environment."""
from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT, WRAPPER, Result, read_json, write_config
from fake_scm import FakeSCM

STAMP = re.compile(r"^=== \d{4}-\d\d-\d\d \d\d:\d\d:\d\d ===$")
CRON_ENV_KEYS = ("HOME", "LOGNAME", "SHELL", "PATH")

STAND_IN_CRONTAB = """#!/bin/sh
# A stand-in for crontab(1): keeps "the user's crontab" in $CRONTAB_FILE.
case "$1" in
    -l) if [ -f "$CRONTAB_FILE" ]; then cat "$CRONTAB_FILE"; else echo "no crontab for $LOGNAME" >&2; exit 1; fi ;;
    -) cat > "$CRONTAB_FILE" ;;
    *) echo "stand-in crontab: unexpected $*" >&2; exit 2 ;;
esac
"""


@pytest.fixture(scope="module")
def plain_fake():
    """The strict stand-in over plain http on 127.0.0.1, which cron's environment can reach without a CA."""
    fake = FakeSCM(tls=False).start()
    yield fake
    fake.stop()


@pytest.fixture
def install(tmp_path):
    """A fresh install of the tool: module and wrapper copied, a .venv/bin/python that runs this interpreter."""
    home = tmp_path / "install"
    (home / ".venv" / "bin").mkdir(parents=True)
    (home / "secrets").mkdir()
    shutil.copy(ROOT / "scm_token_cache.py", home)
    shutil.copy(WRAPPER, home)
    python = home / ".venv" / "bin" / "python"
    python.write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    python.chmod(0o755)
    return home


@pytest.fixture
def crontab(tmp_path):
    """A stand-in crontab command on PATH, never the real user's crontab."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    script = bin_dir / "crontab"
    script.write_text(STAND_IN_CRONTAB)
    script.chmod(0o755)
    table = tmp_path / "crontab.txt"
    return bin_dir, table


def cron_env(home: Path, **extra) -> dict:
    """Exactly what cron gives a job: HOME, LOGNAME, SHELL=/bin/sh, PATH=/usr/bin:/bin."""
    return {"HOME": str(home), "LOGNAME": "scm", "SHELL": "/bin/sh", "PATH": "/usr/bin:/bin", **extra}


def run_like_cron(command: str, home: Path) -> Result:
    home.mkdir(exist_ok=True)
    completed = subprocess.run(["env", "-i", *(f"{k}={v}" for k, v in cron_env(home).items()),
                                "/bin/sh", "-c", command], cwd=home, capture_output=True, text=True, timeout=60,
                               stdin=subprocess.DEVNULL)
    return Result(completed)


def tool(install: Path, *args, env: dict, table: Path | None = None, bin_dir: Path | None = None) -> Result:
    environment = {**env}
    if bin_dir is not None:
        environment.update(PATH=f"{bin_dir}:{env['PATH']}", CRONTAB_FILE=str(table), LOGNAME="scm")
    completed = subprocess.run([sys.executable, str(install / "scm_token_cache.py"), *args], env=environment,
                               capture_output=True, text=True, timeout=60)
    return Result(completed)


def log_blocks(log_dir: Path) -> list[list[str]]:
    (log,) = log_dir.glob("token-cache-*.log")
    assert re.fullmatch(r"token-cache-\d{4}-\d\d-\d\d\.log", log.name)
    assert log.name == time.strftime("token-cache-%Y-%m-%d.log")
    text = log.read_text()
    assert text.endswith("\n\n")
    return [block.splitlines() for block in text[:-1].split("\n\n")]


# --- the wrapper -----------------------------------------------------------------


def test_wrapper_in_cron_environment_refreshes_and_logs(install, plain_fake, tmp_path):
    plain_fake.reset()
    config = write_config(install / "secrets" / "scm-auth.json", plain_fake.config())
    first = run_like_cron(str(install / "run-token-cache.sh"), tmp_path / "home").expect(0)
    second = run_like_cron(str(install / "run-token-cache.sh"), tmp_path / "home").expect(0)
    assert (first.out, first.err, second.out) == ("", "", "")  # not a terminal: all goes to the log
    assert read_json(config)["jwt"] == plain_fake.issued[0]
    assert len(plain_fake.requests) == 1
    blocks = log_blocks(install / "logs")
    assert len(blocks) == 2
    assert STAMP.match(blocks[0][0]) and STAMP.match(blocks[1][0])
    assert blocks[0][1] == "Token expired or missing, fetching new token..."
    assert blocks[0][2].startswith("Token refreshed, expires at: ")
    assert blocks[1][1].startswith("Using cached token, expires at: ")
    assert stat.S_IMODE((install / "logs").stat().st_mode) == 0o700
    log_text = next((install / "logs").glob("*.log")).read_text()
    assert plain_fake.client_secret not in log_text and plain_fake.issued[0] not in log_text


def test_wrapper_exit_status_and_errors_reach_the_log(install, env, tmp_path):
    result = subprocess.run([str(install / "run-token-cache.sh")], env={**env, "LOG_DIR": str(tmp_path / "logs")},
                            capture_output=True, text=True)
    assert result.returncode == 2
    (block,) = log_blocks(tmp_path / "logs")
    assert STAMP.match(block[0])
    config = install / "secrets" / "scm-auth.json"
    assert block[1] == (f"error: config file {config} not found; create it with: install -m 600 -D "
                        f"{install / 'secrets.example' / 'scm-auth.json'} {config} "
                        "and fill in client_id, client_secret and scope")


def test_wrapper_passes_arguments_and_environment(install, env, fake, config, tmp_path):
    logs = tmp_path / "wrapper-logs"
    result = subprocess.run([str(install / "run-token-cache.sh"), "status"],
                            env={**env, "LOG_DIR": str(logs), "SCM_CONFIG_PATH": str(config)},
                            capture_output=True, text=True)
    assert result.returncode == 1  # no token yet: status says a refresh is due
    (block,) = log_blocks(logs)
    assert block[1] == f"config: {config}"
    assert fake.requests == []


def test_wrapper_through_a_symlink_and_python_fallback(install, env, fake, config, tmp_path):
    shutil.rmtree(install / ".venv")
    link = tmp_path / "elsewhere" / "token-cron.sh"
    link.parent.mkdir()
    link.symlink_to(install / "run-token-cache.sh")
    environment = {**env, "SCM_CONFIG_PATH": str(config), "PYTHON": sys.executable}
    del environment["LOG_DIR"]
    result = subprocess.run([str(link)], env=environment, capture_output=True, text=True, cwd="/")
    assert result.returncode == 0, result
    assert read_json(config)["jwt"] == fake.issued[0]
    assert len(log_blocks(install / "logs")) == 1  # logs/ beside the real wrapper, not the link


needs_script = pytest.mark.skipif(shutil.which("script") is None, reason="script(1) from util-linux is not installed")


@needs_script
def test_wrapper_shows_output_on_a_terminal(install, env, fake, config, tmp_path):
    logs = tmp_path / "tty-logs"
    command = f"{install / 'run-token-cache.sh'} run --config {config}"
    result = subprocess.run(["script", "-qec", command, "/dev/null"], env={**env, "LOG_DIR": str(logs)},
                            capture_output=True, text=True, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result
    assert "Token refreshed, expires at: " in result.stdout
    (block,) = log_blocks(logs)
    assert block[2].startswith("Token refreshed, expires at: ")


@needs_script
def test_wrapper_passes_a_failure_status_on_a_terminal(install, env, tmp_path):
    command = f"{install / 'run-token-cache.sh'} run --config {tmp_path / 'missing.json'}"
    result = subprocess.run(["script", "-qec", command, "/dev/null"], env={**env, "LOG_DIR": str(tmp_path / "l")},
                            capture_output=True, text=True, stdin=subprocess.DEVNULL)
    assert result.returncode == 2
    assert "not found" in result.stdout


def test_wrapper_refuses_the_token_command(install, env, tmp_path):
    result = subprocess.run([str(install / "run-token-cache.sh"), "token"], env=env, capture_output=True, text=True)
    assert result.returncode == 2
    assert "run " in result.stderr and "token' directly" in result.stderr
    assert result.stdout == ""


def make_log(directory: Path, name: str, age_days: float) -> Path:
    path = directory / name
    path.write_text("old\n")
    when = time.time() - age_days * 86400
    os.utime(path, (when, when))
    return path


@pytest.mark.parametrize("retention, kept_ages", [(None, [1, 13.9]), ("3", [1]), ("0", [1, 13.9, 14.1, 40])])
def test_log_retention(install, env, tmp_path, retention, kept_ages):
    logs = tmp_path / "logs"
    logs.mkdir()
    ages = {1: "token-cache-a.log", 13.9: "token-cache-b.log", 14.1: "token-cache-c.log", 40: "token-cache-d.log"}
    for age, name in ages.items():
        make_log(logs, name, age)
    other = make_log(logs, "other-file.log", 40)
    nested = logs / "keep"
    nested.mkdir()
    make_log(nested, "token-cache-e.log", 40)
    environment = {**env, "LOG_DIR": str(logs)}
    if retention is not None:
        environment["LOG_RETENTION_DAYS"] = retention
    subprocess.run([str(install / "run-token-cache.sh"), "status"], env=environment, capture_output=True)
    remaining = {p.name for p in logs.glob("token-cache-?.log")}
    assert remaining == {ages[age] for age in kept_ages}
    assert other.exists() and (nested / "token-cache-e.log").exists()
    assert (logs / time.strftime("token-cache-%Y-%m-%d.log")).exists()


@pytest.mark.parametrize("value", ["-1", "two", "1.5", "14 days"])
def test_bad_retention_is_refused(install, env, tmp_path, value):
    result = subprocess.run([str(install / "run-token-cache.sh")], env={**env, "LOG_RETENTION_DAYS": value},
                            capture_output=True, text=True)
    assert result.returncode == 2 and "LOG_RETENTION_DAYS" in result.stderr


def test_wrapper_is_shellcheck_clean():
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck is not installed")
    result = subprocess.run(["shellcheck", str(WRAPPER)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout


# --- install-cron / uninstall-cron -------------------------------------------------


def test_install_into_an_empty_crontab(install, env, crontab):
    bin_dir, table = crontab
    result = tool(install, "install-cron", env=env, bin_dir=bin_dir, table=table).expect(0)
    line = f"*/5 * * * * {install / 'run-token-cache.sh'}"
    assert result.out == f"installed in crontab: {line}\n"
    assert table.read_text() == line + "\n"


def test_install_is_idempotent_and_keeps_other_lines(install, env, crontab):
    bin_dir, table = crontab
    existing = ["# my jobs", "MAILTO=ops@example.com", "", "0 3 * * * /usr/local/bin/backup --all",
                "*/5 * * * * /some/other/run-token-cache.sh"]
    table.write_text("\n".join(existing) + "\n")
    tool(install, "install-cron", env=env, bin_dir=bin_dir, table=table).expect(0)
    tool(install, "install-cron", "--every", "10", env=env, bin_dir=bin_dir, table=table).expect(0)
    lines = table.read_text().splitlines()
    assert lines[:5] == existing
    assert lines[5:] == [f"*/10 * * * * {install / 'run-token-cache.sh'}"]


def test_install_carries_a_non_default_config_path(install, env, crontab, tmp_path):
    bin_dir, table = crontab
    tool(install, "install-cron", "--config", "relative/scm.json", env=env, bin_dir=bin_dir, table=table).expect(0)
    tool(install, "install-cron", env={**env, "SCM_CONFIG_PATH": "/srv/other.json"}, bin_dir=bin_dir,
         table=table).expect(0)
    lines = table.read_text().splitlines()
    assert lines == [
        f"*/5 * * * * SCM_CONFIG_PATH={Path.cwd() / 'relative/scm.json'} {install / 'run-token-cache.sh'}",
        f"*/5 * * * * SCM_CONFIG_PATH=/srv/other.json {install / 'run-token-cache.sh'}",
    ]


@pytest.mark.parametrize("every, schedule", [("1", "*/1 * * * *"), ("30", "*/30 * * * *"), ("60", "0 * * * *")])
def test_every(install, env, crontab, every, schedule):
    bin_dir, table = crontab
    tool(install, "install-cron", "--every", every, env=env, bin_dir=bin_dir, table=table).expect(0)
    assert table.read_text().startswith(schedule + " ")


@pytest.mark.parametrize("every", ["0", "61", "abc", "-5", "2.5"])
def test_bad_every_is_a_usage_error(install, env, crontab, every):
    bin_dir, table = crontab
    result = tool(install, "install-cron", "--every", every, env=env, bin_dir=bin_dir, table=table).expect(2)
    assert "--every" in result.err
    assert not table.exists()


def test_uninstall_removes_only_our_line(install, env, crontab):
    bin_dir, table = crontab
    table.write_text("MAILTO=ops@example.com\n0 3 * * * /usr/local/bin/backup\n")
    tool(install, "install-cron", env=env, bin_dir=bin_dir, table=table).expect(0)
    result = tool(install, "uninstall-cron", env=env, bin_dir=bin_dir, table=table).expect(0)
    assert result.out == f"removed from crontab: {install / 'run-token-cache.sh'}\n"
    assert table.read_text() == "MAILTO=ops@example.com\n0 3 * * * /usr/local/bin/backup\n"
    again = tool(install, "uninstall-cron", env=env, bin_dir=bin_dir, table=table).expect(0)
    assert "nothing to remove" in again.out


def test_uninstall_with_no_crontab(install, env, crontab):
    bin_dir, table = crontab
    assert "nothing to remove" in tool(install, "uninstall-cron", env=env, bin_dir=bin_dir, table=table).expect(0).out
    assert not table.exists()


def test_missing_crontab_command(install, env, tmp_path):
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    result = tool(install, "install-cron", env={**env, "PATH": str(empty)}).expect(2)
    assert "apt-get install cron" in result.err
    assert f"*/5 * * * * {install / 'run-token-cache.sh'}" in result.err
    assert "Traceback" not in result.err


def test_installed_line_runs_under_cron(install, env, crontab, plain_fake, tmp_path):
    plain_fake.reset()
    bin_dir, table = crontab
    (tmp_path / "tenant").mkdir()
    config = write_config(tmp_path / "tenant" / "scm-auth.json", plain_fake.config())
    tool(install, "install-cron", "--config", config, env=env, bin_dir=bin_dir, table=table).expect(0)
    (line,) = table.read_text().splitlines()
    command = line.split(None, 5)[5]
    run_like_cron(command, tmp_path / "home").expect(0)
    assert read_json(config)["jwt"] == plain_fake.issued[0]
    (block,) = log_blocks(install / "logs")
    assert block[2].startswith("Token refreshed, expires at: ")


def test_demo_runs_without_an_account(env):
    result = subprocess.run([sys.executable, str(ROOT / "tests" / "fake_scm.py"), "--demo"], env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result
    assert "the stand-in saw 1 token request(s)" in result.stdout
    assert "Token refreshed, expires at: " in result.stdout and "Using cached token, expires at: " in result.stdout
    work = re.search(r"config (/\S+)/scm-auth.json", result.stdout).group(1)
    assert not os.path.exists(work)


def test_install_needs_the_wrapper_beside_the_module(install, env, crontab):
    bin_dir, table = crontab
    (install / "run-token-cache.sh").unlink()
    result = tool(install, "install-cron", env=env, bin_dir=bin_dir, table=table).expect(2)
    assert "run-token-cache.sh is missing or not executable" in result.err
    assert not table.exists()


def test_wrapper_still_refreshes_when_the_log_cannot_be_written(install, env, fake, config, tmp_path):
    not_a_directory = tmp_path / "file"
    not_a_directory.write_text("")
    result = subprocess.run([str(install / "run-token-cache.sh"), "run", "--config", str(config)],
                            env={**env, "LOG_DIR": str(not_a_directory / "logs")}, capture_output=True, text=True)
    assert result.returncode == 0, result
    assert "warning: cannot write to " in result.stderr
    assert result.stdout.splitlines()[-1].startswith("Token refreshed")
    assert read_json(config)["jwt"] == fake.issued[0]


@pytest.mark.skipif(not os.path.exists("/usr/bin/python3"), reason="no /usr/bin/python3 for the fallback")
def test_wrapper_falls_back_to_python3_on_cron_path(install, fake, tmp_path):
    shutil.rmtree(install / ".venv")
    # A cached token needs neither requests nor dateutil, so the system python3 can serve it.
    config = write_config(install / "secrets" / "scm-auth.json",
                          fake.config(jwt="eyJcached", jwt_expires_at="2099-01-01T00:00:00Z"))
    run_like_cron(str(install / "run-token-cache.sh"), tmp_path / "home").expect(0)
    (block,) = log_blocks(install / "logs")
    assert block[1] == "Using cached token, expires at: 2099-01-01 00:00:00 +0000 UTC"
    assert read_json(config)["jwt"] == "eyJcached"


def test_percent_in_the_config_path_is_escaped_for_cron(install, env, crontab, tmp_path):
    bin_dir, table = crontab
    tool(install, "install-cron", "--config", "/srv/100%/scm.json", env=env, bin_dir=bin_dir, table=table).expect(0)
    assert table.read_text() == f"*/5 * * * * SCM_CONFIG_PATH=/srv/100\\%/scm.json {install / 'run-token-cache.sh'}\n"
