"""A configuration file re-read when it changes: AUTH_TOKENS_FILE, TENANT_LIMITS_FILE,
DESTINATIONS_FILE.

:class:`Watched` parses the file at start-up (a missing or malformed file is a
:class:`ConfigError` naming the setting and the path) and again whenever its
(inode, size, mtime) changes, checked by ``stat`` on use (at most every
``check_every_s`` when that is given); a version that no longer parses leaves the last
good one in force, and says so once (``config_file_reload_failed``). A loader raises
ValueError (named here by setting and path) or a ConfigError that names them itself.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from typing import Any

from otelworker.exceptions import ConfigError
from otelworker.logs import log_event


class Watched:
    """A file re-read when its (inode, size, mtime) changes; ``load`` parses its bytes."""

    def __init__(
        self,
        path: str,
        setting: str,
        load: Callable[[bytes], Any],
        *,
        check_every_s: float = 0.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.path = path
        self.setting = setting
        self._load = load
        self._stamp: tuple[int, int, int] | None = None
        self.value: Any = None
        self.generation = 0
        self._failed_stamp: tuple[int, int, int] | None = None
        # At most one stat per this many seconds (0: on every use).
        self._check_every_s = check_every_s
        self._clock = clock
        self._checked_at: float | None = None

    def first_load(self) -> None:
        """At startup: a missing or malformed file is a configuration error."""
        try:
            stamp = self._stat()
            with open(self.path, "rb") as fh:
                data = fh.read()
        except OSError as exc:
            raise ConfigError(f"{self.setting}: cannot read {self.path}: {exc.strerror}") from None
        try:
            self.value = self._load(data)
        except ConfigError:
            raise  # the loader's own message names the setting, the file and the entry
        except ValueError as exc:
            raise ConfigError(f"{self.setting}: {self.path}: {exc}") from None
        self._stamp = stamp
        self.generation += 1

    def _stat(self) -> tuple[int, int, int]:
        st = os.stat(self.path)
        return (st.st_ino, st.st_size, st.st_mtime_ns)

    def current(self) -> Any:
        """The value, re-read first if the file changed; the last good one if it fails."""
        if self._check_every_s > 0:
            now = self._clock()
            if self._checked_at is not None and now - self._checked_at < self._check_every_s:
                return self.value
            self._checked_at = now
        try:
            stamp = self._stat()
        except OSError as exc:
            self._reload_failed(None, f"cannot read the file: {exc.strerror}")
            return self.value
        if stamp == self._stamp:
            self._failed_stamp = None
            return self.value
        if stamp == self._failed_stamp:
            return self.value
        try:
            with open(self.path, "rb") as fh:
                data = fh.read()
            value = self._load(data)
        except (OSError, ValueError, ConfigError) as exc:
            self._reload_failed(stamp, exc.strerror if isinstance(exc, OSError) else str(exc))
            return self.value
        self.value = value
        self._stamp = stamp
        self._failed_stamp = None
        self.generation += 1
        log_event(
            "config_file_reloaded",
            f"{self.setting} re-read",
            reason="file_changed",
            setting=self.setting,
            path=self.path,
        )
        return value

    def _reload_failed(self, stamp: tuple[int, int, int] | None, why: str | None) -> None:
        if stamp is not None and stamp == self._failed_stamp:
            return
        if stamp is None and self._failed_stamp == (0, 0, 0):
            return
        self._failed_stamp = stamp if stamp is not None else (0, 0, 0)
        log_event(
            "config_file_reload_failed",
            f"{self.setting} could not be re-read; the last good version stays in force",
            reason="invalid_file",
            level=logging.ERROR,
            setting=self.setting,
            path=self.path,
            error=why,
        )
