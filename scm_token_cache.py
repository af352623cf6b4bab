#!/usr/bin/env python3
"""Keep a Strata Cloud Manager (SCM) API token fresh in its JSON config file.

The config file holds the OAuth2 client credentials (the format scm-go and
terraform-provider-scm read). When the cached `jwt` is missing or expires
within a buffer, fetch a new one with the client-credentials grant and rewrite
the file atomically with `jwt`, `jwt_expires_at` and `jwt_lifetime`, under an
exclusive lock so that simultaneous runs make one token request. Run it from
cron (`run`), ask it for a token (`token`, `get_token()`), or probe it
(`status`).
"""
from __future__ import annotations

import argparse
import datetime
import errno
import fcntl
import json
import os
import stat
import sys
import time

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing costs milliseconds at start-up, and the cached path is run all day
    from collections.abc import Callable, Sequence
    from typing import Any

HERE = os.path.dirname(os.path.realpath(__file__))
DEFAULT_CONFIG = os.path.join(HERE, "secrets", "scm-auth.json")
WRAPPER = os.path.join(HERE, "run-token-cache.sh")
DEFAULT_AUTH_URL = "https://auth.apps.paloaltonetworks.com/auth/v1/oauth2/access_token"
DEFAULT_BUFFER = 300
DEFAULT_TIMEOUT = 30
DEFAULT_MAX_RETRY_TIME = 60
DEFAULT_LOCK_TIMEOUT = 60
FIRST_RETRY_DELAY = 1.0
MAX_RETRY_DELAY = 10.0
MAX_LIFETIME = 366 * 24 * 3600  # longer is no SCM token, and would overflow datetime when huge
REQUIRED_KEYS = ("client_id", "client_secret", "scope")


class TokenCacheError(Exception):
    """A problem the user can act on; `exit_code` is what the CLI returns."""

    exit_code = 1


class ConfigError(TokenCacheError):
    """The config file, or the setup around it, needs fixing before any run can work."""

    exit_code = 2


class RefreshError(TokenCacheError):
    """No fresh token could be had: refused, unreachable, bad answer, lock or write failure.

    `cached` is the cached Token when it has not expired yet, for callers that can live with it.
    """

    exit_code = 1
    cached: Token | None = None


class Token:
    """A valid access token, when it expires, and whether this call fetched it."""

    __slots__ = ("value", "expires_at", "refreshed")

    def __init__(self, value: str, expires_at: datetime.datetime, refreshed: bool) -> None:
        self.value, self.expires_at, self.refreshed = value, expires_at, refreshed

    def __repr__(self) -> str:  # never shows the token itself
        return f"Token(expires_at={format_rfc3339(self.expires_at)!r}, refreshed={self.refreshed})"


def warn(message: str) -> None:
    """Tell the operator about something that works but should be fixed."""
    print(f"warning: {message}", file=sys.stderr)


# --- Loading the config ------------------------------------------------------


def resolve_config_path(explicit: str | None = None) -> str:
    """Return the config path: --config, else $SCM_CONFIG_PATH, else secrets/ beside this file."""
    return os.path.abspath(explicit or os.environ.get("SCM_CONFIG_PATH") or DEFAULT_CONFIG)


def read_config(path: str) -> dict[str, Any]:
    """Read and validate the config file, naming the file and key in every error."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        example = os.path.join(HERE, "secrets.example", "scm-auth.json")
        raise ConfigError(
            f"config file {path} not found; create it with: install -m 600 -D {example} {path} "
            "and fill in client_id, client_secret and scope"
        ) from None
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e.strerror}") from None
    return parse_config(raw, path)


def warn_about_config(config: dict[str, Any], path: str) -> None:
    """Warn about settings that work but put the credentials at risk."""
    try:
        mode = stat.S_IMODE(os.stat(path).st_mode)
    except OSError:
        return  # gone since it was read; the next step will say so
    if mode & 0o077:
        warn(f"config file {path} is accessible by group or others (mode {mode:04o}); run: chmod 600 {path}")
    if config.get("skip_verify_certificate") is True:
        warn(f"skip_verify_certificate is true in {path}: the token endpoint's TLS certificate is not checked")


def parse_config(raw: bytes, path: str) -> dict[str, Any]:
    """Turn the file's bytes into a checked config dict."""

    def reject_constant(name: str) -> None:
        raise ValueError(f"{name} is not allowed in JSON")

    def finite_float(text: str) -> float:
        value = float(text)
        if value in (float("inf"), float("-inf")):
            raise ValueError(f"the number {text[:20]} is too large")
        return value

    try:
        config = json.loads(raw.decode("utf-8"), parse_constant=reject_constant, parse_float=finite_float)
    except UnicodeDecodeError as e:
        raise ConfigError(f"config file {path} is not UTF-8 text (byte {e.start}); save it as UTF-8 JSON") from None
    except json.JSONDecodeError as e:
        where = f"line {e.lineno} column {e.colno}"
        raise ConfigError(f"config file {path} is not valid JSON: {e.msg} at {where}") from None
    except (ValueError, RecursionError) as e:
        raise ConfigError(f"config file {path} is not valid JSON: {e}") from None
    if not isinstance(config, dict):
        kind = {list: "an array", str: "a string", bool: "a boolean", type(None): "null"}.get(type(config), "a number")
        raise ConfigError(f"config file {path} must hold a JSON object {{...}}, not {kind}")
    for key in REQUIRED_KEYS:
        if not isinstance(config.get(key), str) or not config[key].strip():
            state = "missing" if key not in config else "not a non-empty string"
            raise ConfigError(f"config file {path}: {key!r} is {state}; set it to your SCM service account's {key}")
    check_auth_url(config.get("auth_url", DEFAULT_AUTH_URL), path)
    headers = config.get("headers", {})
    if not isinstance(headers, dict) or not all(valid_header(k, v) for k, v in headers.items()):
        raise ConfigError(
            f"config file {path}: 'headers' must be an object of header names to single-line Latin-1 strings"
        )
    if not isinstance(config.get("skip_verify_certificate", False), bool):
        raise ConfigError(f"config file {path}: 'skip_verify_certificate' must be true or false")
    return config


def valid_header(name: str, value: Any) -> bool:
    """True for a header http.client can send: a plain name and a one-line Latin-1 value."""
    if not isinstance(value, str) or not name.isascii() or not name.isprintable():
        return False
    if not name or any(c in name for c in " :") or any(c in value for c in "\r\n\0"):
        return False
    return all(ord(c) < 256 for c in value)


def check_auth_url(url: Any, path: str) -> None:
    """Allow https, or http to a loopback host (tests and local proxies)."""
    from urllib.parse import urlsplit

    if not isinstance(url, str):
        raise ConfigError(f"config file {path}: 'auth_url' must be a string")
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError:
        raise ConfigError(f"config file {path}: 'auth_url' is not a valid URL") from None
    if not host or not (parts.scheme == "https" or (parts.scheme == "http" and is_loopback(host))):
        raise ConfigError(
            f"config file {path}: 'auth_url' {safe_url(url)} must be an https:// URL "
            "(plain http:// is allowed only for loopback: 127.0.0.0/8, ::1 and localhost)"
        )


def is_loopback(host: str) -> bool:
    """True for localhost and the loopback addresses (127.0.0.0/8, ::1)."""
    import ipaddress

    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def safe_url(url: str) -> str:
    """Return the URL without user info, query or fragment, fit for messages."""
    from urllib.parse import urlsplit

    try:
        parts = urlsplit(url)
        netloc = parts.netloc.rpartition("@")[2]
    except ValueError:
        return "(unparseable URL)"
    return f"{parts.scheme}://{netloc}{parts.path}"


# --- Deciding ----------------------------------------------------------------


def has_token(config: dict[str, Any]) -> bool:
    return isinstance(config.get("jwt"), str) and bool(config["jwt"])


def cached_expiry(config: dict[str, Any]) -> datetime.datetime | None:
    """Return when the cached token expires, or None when there is no usable token."""
    return parse_time(config.get("jwt_expires_at")) if has_token(config) else None


def parse_time(value: Any) -> datetime.datetime | None:
    """Read an RFC 3339 time leniently; None when it is unusable or has no zone."""
    if not isinstance(value, str):
        return None
    try:
        # What we write ourselves parses without importing dateutil (the cached path stays fast).
        parsed = datetime.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        from dateutil.parser import isoparse

        try:
            parsed = isoparse(value)
        except (ValueError, OverflowError):
            return None
    if parsed.tzinfo is None or parsed.utcoffset() is None:
        return None
    try:
        return parsed.astimezone(datetime.timezone.utc)
    except OverflowError:  # e.g. 9999-12-31T23:59:59-23:59
        return None


def refresh_due(expires_at: datetime.datetime | None, now: datetime.datetime, buffer: float) -> bool:
    """True when there is no token or it expires within `buffer` seconds of `now`."""
    return expires_at is None or (expires_at - now).total_seconds() <= buffer


def utc_now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


def format_rfc3339(moment: datetime.datetime) -> str:
    return moment.astimezone(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def format_human(moment: datetime.datetime) -> str:
    """Format like Go's time.Time String(), as the original service printed it."""
    return moment.astimezone(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S +0000 UTC")


# --- Fetching ----------------------------------------------------------------


def fetch_token(config: dict[str, Any], timeout: float, max_retry_time: float) -> tuple[str, int, datetime.datetime]:
    """POST the client credentials; return (access_token, expires_in, time the request was sent).

    Connection errors, timeouts, 429 and 5xx are retried with exponential
    backoff and jitter (honouring Retry-After) while `max_retry_time` allows.
    """
    import random

    import requests

    url = config.get("auth_url", DEFAULT_AUTH_URL)
    unreachable = f"could not reach token endpoint {safe_url(url)}"
    secrets = secret_strings(config)
    deadline = time.monotonic() + max_retry_time
    delay = FIRST_RETRY_DELAY
    attempts = 0
    verify = tls_verify(config)
    if verify is False:
        import urllib3

        urllib3.disable_warnings(urllib3.exceptions.InsecureRequestWarning)  # warn_about_config said it once
    with requests.Session() as session:
        while True:
            attempts += 1
            sent_at = utc_now().replace(microsecond=0)
            retry_after = None
            try:
                response = post_credentials(session, config, timeout, verify)
            except requests.exceptions.SSLError as e:  # a certificate problem does not go away by retrying
                raise RefreshError(f"{unreachable}: {describe_network_error(e)}") from None
            except (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError) as e:
                problem = f"{unreachable}: {describe_network_error(e)}"
            except (requests.RequestException, ValueError) as e:
                failed = f"token request to {safe_url(url)} failed: {type(e).__name__}"
                raise RefreshError(scrub(failed, secrets)) from None
            else:
                if 200 <= response.status_code < 300:
                    token, expires_in = read_token_response(response, url, secrets)
                    return token, expires_in, sent_at
                problem = scrub(describe_refusal(response, url), secrets)
                if response.status_code != 429 and response.status_code < 500:
                    raise RefreshError(problem)
                retry_after = parse_retry_after(response.headers.get("Retry-After"))
            wait = retry_after if retry_after is not None else random.uniform(delay / 2, delay)
            delay = min(delay * 2, MAX_RETRY_DELAY)
            if time.monotonic() + wait > deadline:
                tries = "1 attempt" if attempts == 1 else f"{attempts} attempts"
                raise RefreshError(f"{problem} (gave up after {tries}; --max-retry-time is {max_retry_time:g}s)")
            time.sleep(wait)


def post_credentials(session: Any, config: dict[str, Any], timeout: float, verify: bool | str) -> Any:
    """Send one token request.

    pan.dev's access-token page and scm-go send the client credentials with
    HTTP Basic auth and a form-encoded body, not the JSON body the seed showed:
    https://pan.dev/scm/docs/access-tokens/
    """
    return session.post(
        config.get("auth_url", DEFAULT_AUTH_URL),
        auth=(config["client_id"].encode(), config["client_secret"].encode()),
        data={"grant_type": "client_credentials", "scope": config["scope"]},
        headers={"Accept": "application/json", **config.get("headers", {})},
        timeout=timeout,
        verify=verify,  # per request: a session's verify=False would lose to $REQUESTS_CA_BUNDLE
        allow_redirects=False,  # a redirect would carry the credentials elsewhere
    )


def tls_verify(config: dict[str, Any]) -> bool | str:
    """Return requests' `verify`: off only by skip_verify_certificate; $SSL_CERT_FILE honoured too."""
    if config.get("skip_verify_certificate") is True:
        return False
    if not (os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("CURL_CA_BUNDLE")):
        return os.environ.get("SSL_CERT_FILE") or True
    return True  # requests reads REQUESTS_CA_BUNDLE / CURL_CA_BUNDLE itself


def read_token_response(response: Any, url: str, secrets: list[str]) -> tuple[str, int]:
    """Check a 2xx answer: a JSON object with an access_token and a positive integer expires_in."""
    where = f"token endpoint {safe_url(url)}"
    try:
        body = response.json()
    except ValueError:
        raise RefreshError(f"{where} answered {response.status_code} but the body is not JSON") from None
    if not isinstance(body, dict):
        raise RefreshError(f"{where} answered {response.status_code} with JSON that is not an object")
    token, expires_in = body.get("access_token"), body.get("expires_in")
    if not isinstance(token, str) or not token.strip():
        raise RefreshError(f"{where} answered {response.status_code} without an access_token")
    if type(expires_in) is not int or not 0 < expires_in <= MAX_LIFETIME:
        raise RefreshError(
            f"{where} answered {response.status_code} without a plausible expires_in (1 to {MAX_LIFETIME})"
        )
    if any(c.isspace() for c in token):
        raise RefreshError(f"{where} answered {response.status_code} with an access_token containing whitespace")
    return token, expires_in


def describe_refusal(response: Any, url: str) -> str:
    """Say what a non-2xx answer was: status, and the OAuth2 error and error_description if present."""
    text = f"token endpoint {safe_url(url)} answered {response.status_code}"
    if 300 <= response.status_code < 400:
        return f"{text} (a redirect to {safe_url(response.headers.get('Location', ''))}); set auth_url to the final URL"
    try:
        body = response.json()
    except ValueError:
        body = None
    if isinstance(body, dict):
        details = [printable(body[k]) for k in ("error", "error_description") if isinstance(body.get(k), str)]
        if details:
            text += ": " + " - ".join(details)
    if response.status_code in (400, 401, 403):
        text += "; check client_id, client_secret and scope in the config file"
    return text


def printable(text: str, limit: int = 200) -> str:
    """Keep server-supplied text short and free of control characters."""
    cleaned = "".join(c if c.isprintable() else " " for c in text)
    return cleaned if len(cleaned) <= limit else cleaned[:limit] + "..."


def describe_network_error(error: Exception) -> str:
    """Name the kind of network failure without echoing library internals."""
    import requests

    if isinstance(error, requests.exceptions.SSLError):
        return "TLS certificate verification failed (set REQUESTS_CA_BUNDLE for a private CA)"
    if isinstance(error, requests.Timeout):
        return "timed out (see --timeout)"
    if isinstance(error, requests.exceptions.ChunkedEncodingError) or "IncompleteRead" in repr(error):
        return "the answer was cut off"
    if isinstance(error, requests.exceptions.ProxyError):
        return "the proxy refused the connection"
    if "NameResolution" in repr(error) or "getaddrinfo" in repr(error):
        return "host name lookup failed"
    if "Connection refused" in repr(error):
        return "connection refused"
    return "connection failed"


def parse_retry_after(value: str | None) -> float | None:
    """Read Retry-After as seconds or an HTTP date; None when absent or unreadable."""
    if not value:
        return None
    if value.strip().isdigit():
        return float(value.strip())
    from email.utils import parsedate_to_datetime

    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=datetime.timezone.utc)
    return max(0.0, (when - utc_now()).total_seconds())


def secret_strings(config: dict[str, Any]) -> list[str]:
    """Everything that must never be printed, in the forms it could travel in."""
    import base64
    from urllib.parse import quote_plus

    secret = config["client_secret"]
    basic = base64.b64encode(f"{config['client_id']}:{secret}".encode()).decode()
    values = [secret, quote_plus(secret), basic]
    if isinstance(config.get("jwt"), str):
        values.append(config["jwt"])
    return [v for v in values if v]


def scrub(text: str, secrets: list[str]) -> str:
    """Replace every secret in `text` with [redacted]."""
    for secret in sorted(secrets, key=len, reverse=True):
        text = text.replace(secret, "[redacted]")
    return text


# --- Writing -----------------------------------------------------------------


def serialize(config: dict[str, Any]) -> bytes:
    return (json.dumps(config, indent=2, ensure_ascii=False) + "\n").encode("utf-8")


def write_atomically(path: str, data: bytes) -> None:
    """Replace the file at `path` (a symlink's target) with `data`, all or nothing.

    The temp file lives in the target's directory so that os.replace is a
    rename; it is created private, then given the original's mode and owner.
    """
    import tempfile

    target = os.path.realpath(path)
    directory, name = os.path.split(target)
    try:
        original = os.stat(target)
        fd, temp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=directory)
    except OSError as e:
        raise write_error(e, target) from None
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), stat.S_IMODE(original.st_mode))
            if (original.st_uid, original.st_gid) != (os.geteuid(), os.getegid()):
                try:
                    os.fchown(f.fileno(), original.st_uid, original.st_gid)
                except PermissionError:
                    pass  # not root: the file becomes ours, as any rewrite would make it
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temp, target)
    except BaseException as e:
        try:
            os.unlink(temp)
        except FileNotFoundError:
            pass
        if isinstance(e, OSError):
            raise write_error(e, target) from None
        raise
    fsync_directory(directory)


def fsync_directory(directory: str) -> None:
    """Make the rename durable; some filesystems cannot fsync a directory, which is harmless."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_error(error: OSError, target: str) -> RefreshError:
    """Explain why the config could not be rewritten; the original is untouched."""
    directory = os.path.dirname(target)
    reasons = {
        errno.ENOSPC: f"no space left on the device holding {directory}",
        errno.EDQUOT: f"disk quota exceeded in {directory}",
        errno.EROFS: f"{directory} is on a read-only filesystem",
        errno.EBUSY: f"{target} is busy, as a single-file bind mount is; mount its directory instead",
        errno.EXDEV: f"{target} is a mount point, as a single-file bind mount is; mount its directory instead",
    }
    reason = reasons.get(
        error.errno,
        f"{error.strerror or error} in {directory} (the tool needs write access to the directory to replace the file)",
    )
    return RefreshError(f"could not rewrite config file {target}: {reason}; the file was left unchanged")


def remove_stale_temp_files(path: str) -> None:
    """Delete temp files that a killed run left beside the config (call with the lock held)."""
    import glob

    target = os.path.realpath(path)
    directory, name = os.path.split(target)
    for temp in glob.glob(os.path.join(glob.escape(directory), f".{glob.escape(name)}.*.tmp")):
        try:
            os.unlink(temp)
        except OSError:
            pass


# --- Locking -----------------------------------------------------------------


class ConfigLock:
    """An exclusive flock(2) on `<config>.lock`, so `flock <config>.lock cmd` cooperates."""

    def __init__(self, path: str, timeout: float) -> None:
        self.path = path + ".lock"
        self.timeout = timeout
        self.fd = -1

    def __enter__(self) -> ConfigLock:
        try:
            self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as e:
            raise RefreshError(f"cannot open lock file {self.path}: {e.strerror}") from None
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return self
            except OSError as e:
                if not isinstance(e, BlockingIOError):  # e.g. ENOLCK on a network filesystem
                    os.close(self.fd)
                    raise RefreshError(f"cannot lock {self.path}: {e.strerror}") from None
                if time.monotonic() >= deadline:
                    os.close(self.fd)
                    raise RefreshError(
                        f"another run held lock file {self.path} for longer than {self.timeout:g}s "
                        "(--lock-timeout); try again, or find the process holding it with: fuser " + self.path
                    ) from None
                time.sleep(0.05)

    def __exit__(self, *exc: object) -> None:
        os.close(self.fd)  # closing releases the flock


# --- The one path every command shares ----------------------------------------


def ensure_token(
    path: str,
    buffer: float = DEFAULT_BUFFER,
    *,
    force: bool = False,
    timeout: float = DEFAULT_TIMEOUT,
    max_retry_time: float = DEFAULT_MAX_RETRY_TIME,
    lock_timeout: float = DEFAULT_LOCK_TIMEOUT,
    now: Callable[[], datetime.datetime] = utc_now,
    on_fetch: Callable[[], None] = lambda: None,
) -> Token:
    """Return a token valid for more than `buffer` seconds, refreshing the file under the lock if due."""
    config = read_config(path)
    warn_about_config(config, path)
    expires_at = cached_expiry(config)
    if not force and not refresh_due(expires_at, now(), buffer):
        return Token(config["jwt"], expires_at, refreshed=False)
    with ConfigLock(path, lock_timeout):
        # Another run may have refreshed while we waited for the lock: decide again on what is there now.
        config = read_config(path)
        expires_at = cached_expiry(config)
        if not force and not refresh_due(expires_at, now(), buffer):
            return Token(config["jwt"], expires_at, refreshed=False)
        if has_token(config) and expires_at is None:
            warn(f"config file {path}: jwt_expires_at is missing or not an RFC 3339 time with a zone")
        remove_stale_temp_files(path)
        on_fetch()
        try:
            token, lifetime, sent_at = fetch_token(config, timeout, max_retry_time)
        except RefreshError as e:
            if expires_at is None or expires_at <= now():
                raise
            still_valid = RefreshError(f"{e}; the cached token stays valid until {format_human(expires_at)}")
            still_valid.cached = Token(config["jwt"], expires_at, refreshed=False)
            raise still_valid from None
        expires_at = sent_at + datetime.timedelta(seconds=lifetime)
        config.update(jwt=token, jwt_expires_at=format_rfc3339(expires_at), jwt_lifetime=lifetime)
        write_atomically(path, serialize(config))
    if lifetime <= buffer:
        warn(f"the token lives {lifetime}s, not more than the {buffer:g}s buffer: every run will refresh it")
    return Token(token, expires_at, refreshed=True)


def usable_token(path: str, buffer: float = DEFAULT_BUFFER, **options: Any) -> str:
    """Like ensure_token, but when the refresh fails, fall back (with a warning) to a cached token not yet expired.

    Consumers keep working through a token-endpoint outage shorter than the buffer; `run` still fails loudly.
    """
    try:
        return ensure_token(path, buffer, **options).value
    except RefreshError as e:
        if e.cached is None:
            raise
        warn(f"could not refresh the token: {e}")
        return e.cached.value


def get_token(config_path: str | None = None, buffer: float = DEFAULT_BUFFER) -> str:
    """Return a valid SCM access token, refreshing it first (under the lock) when it is due.

    Raises ConfigError when the config file is unusable and RefreshError when
    no unexpired token could be had; both are TokenCacheError, whose
    `exit_code` is 2 or 1.
    """
    return usable_token(resolve_config_path(config_path), buffer)


# --- Commands ------------------------------------------------------------------


def seconds_left(expires_at: datetime.datetime, now: datetime.datetime) -> int:
    return int((expires_at - now).total_seconds())


def refresh_options(args: argparse.Namespace) -> dict[str, Any]:
    """The options `run` and `token` pass on to ensure_token."""
    return {"force": args.force, "timeout": args.timeout, "max_retry_time": args.max_retry_time,
            "lock_timeout": args.lock_timeout}


def cmd_run(args: argparse.Namespace) -> int:
    """Refresh the token in the config file when it is due (the cron job)."""
    text = not (args.json or args.quiet)

    def announce() -> None:
        if text:
            reason = "Refresh forced" if args.force else "Token expired or missing"
            print(f"{reason}, fetching new token...", flush=True)

    token = ensure_token(resolve_config_path(args.config), args.buffer, on_fetch=announce, **refresh_options(args))
    if args.json:
        action = "refreshed" if token.refreshed else "cached"
        print(json.dumps({"action": action, "expires_at": format_rfc3339(token.expires_at),
                          "seconds_left": seconds_left(token.expires_at, utc_now())}))
    elif text:
        state = "Token refreshed" if token.refreshed else "Using cached token"
        print(f"{state}, expires at: {format_human(token.expires_at)}")
    return 0


def cmd_token(args: argparse.Namespace) -> int:
    """Print a valid token and nothing else, refreshing it first when it is due."""
    print(usable_token(resolve_config_path(args.config), args.buffer, **refresh_options(args)))
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    """Report the cached token's health without a request or a write; exit 1 when a refresh is due."""
    path = resolve_config_path(args.config)
    config = read_config(path)
    warn_about_config(config, path)
    now = utc_now()
    expires_at = cached_expiry(config)
    due = refresh_due(expires_at, now, args.buffer)
    left = None if expires_at is None else seconds_left(expires_at, now)
    if args.json:
        print(json.dumps({
            "config": path,
            "has_token": has_token(config),
            "expires_at": None if expires_at is None else format_rfc3339(expires_at),
            "seconds_left": left,
            "refresh_due": due,
        }))
    else:
        print(f"config: {path}")
        if expires_at is None:
            print("token: none" if not has_token(config) else "token: present, but jwt_expires_at is unreadable")
        else:
            print(f"expires at: {format_human(expires_at)}")
            print(f"seconds left: {left}" + (" (expired)" if left <= 0 else ""))
        print(f"refresh due: {'yes' if due else 'no'} (buffer {args.buffer:g}s)")
    return 1 if due else 0


def cron_line(every: int, path: str) -> str:
    """The crontab line that runs the wrapper every `every` minutes for the config at `path`."""
    import shlex

    schedule = "0 * * * *" if every == 60 else f"*/{every} * * * *"
    command = shlex.quote(WRAPPER)
    if path != DEFAULT_CONFIG:
        command = f"SCM_CONFIG_PATH={shlex.quote(path)} {command}"
    command = command.replace("%", "\\%")  # cron turns a bare % into a newline
    return f"{schedule} {command}"


def is_our_line(line: str, ours: str) -> bool:
    """True for a crontab line that runs the same command as `ours`, whatever its schedule."""
    fields = line.split(None, 5)
    return not line.lstrip().startswith("#") and len(fields) == 6 and fields[5] == ours.split(None, 5)[5]


def read_crontab(line: str) -> list[str]:
    """Return the current user's crontab lines; [] when there is none yet."""
    import subprocess

    try:
        listed = subprocess.run(["crontab", "-l"], capture_output=True, text=True)
    except FileNotFoundError:
        raise ConfigError(
            "the crontab command was not found; install cron (Debian: apt-get install cron) "
            f"or add this line to your crontab by hand: {line}"
        ) from None
    if listed.returncode != 0:
        if "no crontab" in listed.stderr.lower():
            return []
        raise TokenCacheError(f"crontab -l failed: {listed.stderr.strip() or listed.returncode}")
    return listed.stdout.splitlines()


def write_crontab(lines: list[str]) -> None:
    import subprocess

    text = "".join(f"{line}\n" for line in lines)
    written = subprocess.run(["crontab", "-"], input=text, capture_output=True, text=True)
    if written.returncode != 0:
        raise TokenCacheError(f"crontab - failed: {written.stderr.strip() or written.returncode}")


def cmd_install_cron(args: argparse.Namespace) -> int:
    """Add (or replace) our line in the user's crontab, keeping every other line."""
    if not os.access(WRAPPER, os.X_OK):
        raise ConfigError(f"{WRAPPER} is missing or not executable; run install-cron from a checkout of "
                          "scm-token-cache, where run-token-cache.sh sits beside scm_token_cache.py")
    line = cron_line(args.every, resolve_config_path(args.config))
    lines = [old for old in read_crontab(line) if not is_our_line(old, line)]
    write_crontab(lines + [line])
    print(f"installed in crontab: {line}")
    return 0


def cmd_uninstall_cron(args: argparse.Namespace) -> int:
    """Remove our line from the user's crontab, keeping every other line."""
    line = cron_line(5, resolve_config_path(args.config))
    lines = read_crontab(line)
    kept = [old for old in lines if not is_our_line(old, line)]
    if len(kept) == len(lines):
        print("no scm-token-cache line for this config in the crontab; nothing to remove")
        return 0
    write_crontab(kept)
    print(f"removed from crontab: {line.split(None, 5)[5]}")
    return 0


# --- Command line ------------------------------------------------------------------


def seconds(text: str) -> float:
    """An argparse type: a non-negative, finite number of seconds."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} must be zero or more seconds")
    return value


def positive_seconds(text: str) -> float:
    """An argparse type: more than zero seconds."""
    value = seconds(text)
    if value == 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be more than zero seconds")
    return value


def minutes(text: str) -> int:
    """An argparse type: whole minutes from 1 to 60."""
    if not text.strip().isdigit() or not 1 <= int(text) <= 60:
        raise argparse.ArgumentTypeError(f"{text!r} must be a whole number of minutes from 1 to 60")
    return int(text)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="scm-token-cache",
        description="Keep a Strata Cloud Manager API token fresh in its JSON config file. "
        "With no command, 'run' is meant.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    config = argparse.ArgumentParser(add_help=False)
    config.add_argument("--config", metavar="PATH",
                        help="config file (default: $SCM_CONFIG_PATH, else secrets/scm-auth.json beside this script)")
    buffer = argparse.ArgumentParser(add_help=False)
    buffer.add_argument("--buffer", type=seconds, default=DEFAULT_BUFFER, metavar="SECONDS",
                        help=f"refresh when the token expires within this many seconds (default {DEFAULT_BUFFER})")
    fetch = argparse.ArgumentParser(add_help=False)
    fetch.add_argument("--force", action="store_true", help="refresh even if the cached token is valid")
    fetch.add_argument("--timeout", type=positive_seconds, default=DEFAULT_TIMEOUT, metavar="SECONDS",
                       help=f"per HTTP request (default {DEFAULT_TIMEOUT})")
    fetch.add_argument("--max-retry-time", type=seconds, default=DEFAULT_MAX_RETRY_TIME, metavar="SECONDS",
                       help=f"total time to spend retrying transient failures; 0 means one try "
                       f"(default {DEFAULT_MAX_RETRY_TIME})")
    fetch.add_argument("--lock-timeout", type=seconds, default=DEFAULT_LOCK_TIMEOUT, metavar="SECONDS",
                       help=f"how long to wait for another run's lock (default {DEFAULT_LOCK_TIMEOUT})")

    run = commands.add_parser("run", parents=[config, buffer, fetch], help="refresh the token if it is due (cron)")
    output = run.add_mutually_exclusive_group()
    output.add_argument("--json", action="store_true", help="print one JSON object instead of the text lines")
    output.add_argument("--quiet", action="store_true", help="print nothing on success")
    run.set_defaults(func=cmd_run)

    token = commands.add_parser("token", parents=[config, buffer, fetch],
                                help="print a valid token, refreshing it first if due")
    token.set_defaults(func=cmd_token)

    status = commands.add_parser("status", parents=[config, buffer],
                                 help="report the token's health; no request, no write; exit 1 if due")
    status.add_argument("--json", action="store_true", help="print one JSON object")
    status.set_defaults(func=cmd_status)

    install = commands.add_parser("install-cron", parents=[config], help="run the wrapper from your crontab")
    install.add_argument("--every", type=minutes, default=5, metavar="MINUTES", help="1 to 60 (default 5)")
    install.set_defaults(func=cmd_install_cron)

    uninstall = commands.add_parser("uninstall-cron", parents=[config], help="remove our line from your crontab")
    uninstall.set_defaults(func=cmd_uninstall_cron)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or (argv[0].startswith("-") and argv[0] not in ("-h", "--help")):
        argv.insert(0, "run")
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except TokenCacheError as e:
        if args.command == "run" and args.json:
            print(json.dumps({"action": "failed", "error": str(e)}))
        prefix = "Failed to refresh JWT" if isinstance(e, RefreshError) else "error"
        print(f"{prefix}: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
