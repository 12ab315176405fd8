"""Bearer tokens the tests use, so that the session can check none reached a log line.

Every test that makes a token calls :func:`new_token`; ``tests/conftest.py`` watches every
log record of the session (in-process services) and fails the session's teardown if one
of these tokens appears in any of them. A service run as a subprocess (or a command) writes
its lines elsewhere: :func:`leaked` checks that text.
"""

from __future__ import annotations

import secrets

ISSUED: set[str] = set()


def new_token() -> str:
    token = f"otw-secret-{secrets.token_urlsafe(18)}"
    ISSUED.add(token)
    return token


def leaked(text: str) -> list[str]:
    """The issued tokens found in ``text``: a service process's log, a command's output.

    The session's watch sees only the log records of this process; a test that runs the
    service (or a command) as a subprocess checks that process's output with this."""
    return sorted(token for token in ISSUED if token in text)
