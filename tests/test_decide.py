"""The decision and the time formats, in-process with an injected clock."""
from __future__ import annotations

import datetime

import pytest

import scm_token_cache as stc

UTC = datetime.timezone.utc
NOW = datetime.datetime(2026, 1, 23, 12, 0, 0, tzinfo=UTC)


@pytest.mark.parametrize("seconds_left, buffer, due", [
    (301, 300, False),
    (300, 300, True),  # exactly at the buffer: refresh
    (299, 300, True),
    (300.001, 300, False),
    (0, 300, True),
    (-1, 300, True),
    (1, 0, False),
    (0, 0, True),
    (10_000, 9_999, False),
])
def test_refresh_due_edges(seconds_left, buffer, due):
    assert stc.refresh_due(NOW + datetime.timedelta(seconds=seconds_left), NOW, buffer) is due


def test_no_expiry_is_always_due():
    assert stc.refresh_due(None, NOW, 0) is True


@pytest.mark.parametrize("text, expected", [
    ("2026-01-23T12:34:56Z", datetime.datetime(2026, 1, 23, 12, 34, 56, tzinfo=UTC)),
    ("2026-01-23T12:34:56.789Z", datetime.datetime(2026, 1, 23, 12, 34, 56, 789000, tzinfo=UTC)),
    ("2026-01-23T12:34:56.123456789Z", datetime.datetime(2026, 1, 23, 12, 34, 56, 123456, tzinfo=UTC)),
    ("2026-01-23T14:34:56+02:00", datetime.datetime(2026, 1, 23, 12, 34, 56, tzinfo=UTC)),
    ("2026-01-23T07:04:56-05:30", datetime.datetime(2026, 1, 23, 12, 34, 56, tzinfo=UTC)),
    ("2026-01-23t12:34:56z", datetime.datetime(2026, 1, 23, 12, 34, 56, tzinfo=UTC)),
    ("2026-01-23T12:34:56", None),  # no zone: ambiguous, so refresh
    ("yesterday", None),
    ("", None),
    ("9999-12-31T23:59:59-23:59", None),
    (1769171696, None),
    (None, None),
])
def test_parse_time_is_lenient_but_wants_a_zone(text, expected):
    assert stc.parse_time(text) == expected


def test_formats_match_the_original_service_and_go():
    moment = datetime.datetime(2026, 1, 23, 13, 34, 56, 999999, tzinfo=datetime.timezone(datetime.timedelta(hours=1)))
    assert stc.format_human(moment) == "2026-01-23 12:34:56 +0000 UTC"
    assert stc.format_rfc3339(moment) == "2026-01-23T12:34:56Z"
    assert stc.parse_time(stc.format_rfc3339(moment)) == moment.replace(microsecond=0)


def test_cached_expiry_needs_a_token():
    assert stc.cached_expiry({"jwt_expires_at": "2026-01-23T12:34:56Z"}) is None
    assert stc.cached_expiry({"jwt": "", "jwt_expires_at": "2026-01-23T12:34:56Z"}) is None
    assert stc.cached_expiry({"jwt": "x", "jwt_expires_at": "2026-01-23T12:34:56Z"}) == \
        datetime.datetime(2026, 1, 23, 12, 34, 56, tzinfo=UTC)


@pytest.mark.parametrize("value, seconds", [("0", 0.0), ("7", 7.0), (" 12 ", 12.0), ("", None), (None, None),
                                            ("soon", None), ("-3", None)])
def test_retry_after_seconds(value, seconds):
    assert stc.parse_retry_after(value) == seconds


def test_retry_after_http_date():
    from email.utils import format_datetime

    later = datetime.datetime.now(UTC) + datetime.timedelta(seconds=30)
    assert 25 <= stc.parse_retry_after(format_datetime(later, usegmt=True)) <= 30
    assert stc.parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0


def test_ensure_token_uses_the_injected_clock(fake, tmp_path, monkeypatch):
    from conftest import write_config

    path = write_config(tmp_path / "c.json", fake.config(jwt="eyJold", jwt_expires_at="2026-01-23T12:05:00Z"))
    at = lambda hh, mm, ss: (lambda: datetime.datetime(2026, 1, 23, hh, mm, ss, tzinfo=UTC))  # noqa: E731
    assert stc.ensure_token(str(path), 300, now=at(11, 59, 59)).refreshed is False
    assert fake.requests == []
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", fake.ca_file)
    token = stc.ensure_token(str(path), 300, now=at(12, 0, 0))
    assert token.refreshed and token.value == fake.issued[0]
    assert "eyJ" not in repr(token)
