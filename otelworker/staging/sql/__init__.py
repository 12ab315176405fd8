"""SQL lives in .sql files: ``queries.sql`` under ``-- name: NAME --`` headers; migrations."""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from importlib import resources

_HEADER = re.compile(r"^-- name: (\w+) --$", re.MULTILINE)


def parse_queries(text: str) -> dict[str, str]:
    parts = _HEADER.split(text)
    return {name: body.strip() for name, body in zip(parts[1::2], parts[2::2], strict=True)}


@functools.cache
def queries() -> dict[str, str]:
    return parse_queries(resources.files(__package__).joinpath("queries.sql").read_text())


def query(name: str) -> str:
    return queries()[name]


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str


@functools.cache
def migrations() -> tuple[Migration, ...]:
    found = []
    for entry in resources.files(__package__).joinpath("migrations").iterdir():
        match = re.fullmatch(r"(\d{4})_(\w+)\.sql", entry.name)
        if match:
            found.append(Migration(int(match[1]), match[2], entry.read_text()))
    found.sort(key=lambda m: m.version)
    versions = [m.version for m in found]
    expected = range(1, (versions[-1] if versions else 0) + 1)
    if versions != list(expected):
        raise RuntimeError(f"migrations must be numbered 0001.. without gaps, found {versions}")
    return tuple(found)


def schema() -> str:
    return resources.files(__package__).joinpath("schema.sql").read_text()
