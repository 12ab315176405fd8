"""The compiled OTLP walker (otelworker/_wire.c), or None where the install had no C
compiler (setup.py builds it optionally): each caller then takes the Python path the
walker mirrors, slower but the same answer."""

from __future__ import annotations

from types import ModuleType

compiled: ModuleType | None
try:
    from otelworker import _wire as compiled
except ImportError:  # pragma: no cover - an install without a C compiler
    compiled = None
