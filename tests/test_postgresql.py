"""A PostgreSQL DSN's password never reaches a message, a log line or a traceback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from nursery_down import NurseryDownError
from nursery_down._postgresql import describe_dsn, hide_password
from nursery_down.queues import PostgresQueue

PASSWORD = "S3cr%ZZet@pw"

PG_WORKER = str(Path(__file__).resolve().parent / "programs" / "pg_worker.py") + ":sup"


@pytest.mark.parametrize(
    ("dsn", "secret"),
    [
        ("postgresql://app:S3cretPw@db:5432/app", "S3cretPw"),
        ("postgres://app:p%40ss@db/app", "p@ss"),  # percent-decoded by libpq
        ("postgres://app:p%40ss@db/app", "p%40ss"),
        ("postgresql://app:pa@ss@db/app", "pa@ss"),  # an "@" not encoded
        ("postgresql://app:pa@ss@db/app", "pa"),  # as libpq reads it
        ("host=db password=sekr1t dbname=app", "sekr1t"),
        ("host=db password = 'two words' dbname=app", "two words"),
        ("host=db password='it\\'s' dbname=app", "it's"),
        ("postgresql://app@db/app?password=qpw&sslmode=require", "qpw"),
        ("postgresql://app:S3cretPw!@[::1:5432/app", "S3cretPw!"),  # does not parse
        ("postgresql://app:ab@SecretTail99@db/app", "SecretTail99"),  # read as the host
        ("host=db password=first SecretTail99 dbname=app", "SecretTail99"),  # two words
        ("postgresql://app@db/app?password=first SecretTail99&sslmode=x", "SecretTail99"),
        ("host=db password=ab&cdef port=x", "ab&cdef"),  # & ends only a URI parameter
        ("host=db password=sec\\ret port=x", "secret"),  # unescaped by libpq
        ("host=db password='w@rd'\"x%zz' port=x", "x%zz"),  # quoted in part
    ],
)
def test_every_form_of_the_password_is_hidden(dsn: str, secret: str) -> None:
    message = f'invalid token "{secret}" in "{dsn}"'
    hidden = hide_password(message, dsn)
    assert secret not in hidden
    assert hidden.startswith('invalid token "***"')


def test_a_password_read_in_part_as_the_host_is_not_in_the_servers_description() -> None:
    assert "SecretTail99" not in describe_dsn("postgresql://app:ab@SecretTail99@127.0.0.1/app")


def test_a_short_password_is_hidden_only_where_it_stands_alone() -> None:
    assert hide_password('bad password "ab" for about', "host=db password=ab") == (
        'bad password "***" for about'
    )


def test_a_dsn_without_a_password_leaves_the_text_alone() -> None:
    text = 'could not connect to "db": password authentication failed for user "app"'
    assert hide_password(text, "postgresql://app@db/app") == text


@pytest.mark.parametrize(
    "dsn",
    [
        f"postgresql://app:{PASSWORD}@127.0.0.1:5432/app",
        f"postgresql://app:{PASSWORD}@[::1:5432/app",
        f"host=127.0.0.1 password='{PASSWORD}' port=x5432",
    ],
)
async def test_a_dsn_that_does_not_parse_is_refused_without_its_password(dsn: str) -> None:
    queue = PostgresQueue(dsn, name="secret")
    with pytest.raises(NurseryDownError) as raised:
        await queue.open()
    assert "queue 'secret'" in str(raised.value)
    assert PASSWORD not in str(raised.value)
    assert "ZZet" not in str(raised.value)


@pytest.mark.subprocess
def test_a_program_with_a_bad_dsn_never_prints_its_password(tmp_path: Path) -> None:
    # Its pool crashes at each start until it is FAILED; the fleet, which joins the
    # pool's database, warns that it cannot: every message quotes what libpq said.
    environment = {k: v for k, v in os.environ.items() if not k.startswith("NURSERY_DOWN_")}
    environment.update(
        PG_WORKER_DSN=f"postgresql://app:{PASSWORD}@127.0.0.1:5432/app",
        PG_WORKER_LEDGER=str(tmp_path / "ledger"),
    )
    result = subprocess.run(
        [sys.executable, "-m", "nursery_down", "run", PG_WORKER, "--no-dashboard"],
        capture_output=True,
        text=True,
        env=environment,
        timeout=60,
        check=False,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    assert "invalid PostgreSQL DSN" in output
    assert "fleet" in output
    assert "ZZet" not in output
