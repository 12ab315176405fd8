"""The archive's columnar copy (issue 23): Parquet files per table in the layout of the
Collector's clickhouseexporter, compacted from the OTLP objects (``compact``).

pyarrow is the ``parquet`` extra's: import :mod:`otelworker.columnar.schema` and
:mod:`otelworker.columnar.convert` only where a Parquet feature is used, after
:func:`require_pyarrow`.
"""

from __future__ import annotations

from otelworker.exceptions import ConfigError

EXTRA = "parquet"


def require_pyarrow() -> None:
    """Raise ConfigError naming the extra when pyarrow is not installed."""
    try:
        import pyarrow
        import pyarrow.parquet  # noqa: F401
    except ImportError as exc:
        raise ConfigError(
            f"the Parquet copy (ROLE=compactor, compact) needs pyarrow: install the"
            f" '{EXTRA}' extra (pip install 'otelworker[{EXTRA}]'): {exc}"
        ) from None
