"""The one compiled module, otelworker._wire (OTLP read off the wire for the door's check
and facts and the compactor's span columns: docs/design.md, "Compiled: otelworker._wire").

Optional: where it cannot be built (no C compiler) the install goes on without it and
otelworker uses the Python paths it mirrors, slower (otelworker/wire.py says which ran).
Everything else is in pyproject.toml."""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "otelworker._wire",
            ["otelworker/_wire.c"],
            optional=True,
            extra_compile_args=["-O2", "-std=c11", "-Wall", "-Wno-missing-braces"],
        )
    ]
)
