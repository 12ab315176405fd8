"""Bearer tokens the tests use, so that the session can check none reached a log line.

Every test that makes a token calls :func:`new_token`; ``tests/conftest.py`` watches every
log record of the session (in-process services) and fails the session's teardown if one
of these tokens appears in any of them.
"""

from __future__ import annotations

import secrets

ISSUED: set[str] = set()


def new_token() -> str:
    token = f"otw-secret-{secrets.token_urlsafe(18)}"
    ISSUED.add(token)
    return token
