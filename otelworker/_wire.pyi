from collections.abc import Callable
from typing import Any, Literal

def time_range(signal: str, data: bytes) -> tuple[int, int] | Literal[False] | None: ...
def span_columns(
    data: bytes, render: Callable[[bytes], str]
) -> dict[str, Any] | Literal[False]: ...
