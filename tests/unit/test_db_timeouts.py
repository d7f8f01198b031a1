"""The limits put on every PostgreSQL connection: what reaches libpq."""

from __future__ import annotations

import pytest
import sqlalchemy as sa

from jobflow.adapters.sqlalchemy import DatabaseTimeouts, create_engine, with_timeouts
from jobflow.errors import ConfigurationError

URL = "postgresql+psycopg://app@db.internal/app"


def test_the_defaults_bound_connecting_statements_and_silent_peers() -> None:
    query = with_timeouts(URL).query
    assert query == {
        "connect_timeout": "5", "options": "-c statement_timeout=30000",
        "keepalives": "1", "keepalives_idle": "15", "keepalives_interval": "5",
        "keepalives_count": "3", "tcp_user_timeout": "30000"}


def test_settings_in_the_url_win_and_its_options_are_kept() -> None:
    url = f"{URL}?connect_timeout=9&options=-c%20search_path%3Dapp"
    query = with_timeouts(url, DatabaseTimeouts(statement_seconds=2.5)).query
    assert query["connect_timeout"] == "9"
    assert query["options"] == "-c search_path=app -c statement_timeout=2500"
    own = with_timeouts(f"{URL}?options=-c%20statement_timeout%3D0").query
    assert own["options"] == "-c statement_timeout=0"


def test_no_statement_timeout_and_whole_seconds_for_libpq() -> None:
    query = with_timeouts(URL, DatabaseTimeouts(connect_seconds=0.5, statement_seconds=None,
                                                tcp_seconds=1)).query
    assert "options" not in query
    assert query["connect_timeout"] == "2"  # libpq's least
    assert (query["keepalives_idle"], query["keepalives_interval"]) == ("1", "1")
    assert query["tcp_user_timeout"] == "1000"


def test_sqlite_urls_are_left_alone() -> None:
    assert with_timeouts("sqlite:///jobs.sqlite3") == sa.make_url("sqlite:///jobs.sqlite3")
    engine = create_engine("sqlite://")
    try:
        assert engine.url == sa.make_url("sqlite://")
    finally:
        engine.dispose()


@pytest.mark.parametrize("field", ["connect_seconds", "statement_seconds", "tcp_seconds"])
@pytest.mark.parametrize("value", [0, -1, float("inf"), float("nan")])
def test_nonsense_timeouts_are_refused(field: str, value: float) -> None:
    with pytest.raises(ConfigurationError, match=field):
        DatabaseTimeouts(**{field: value})
