"""The package's own errors. Driver errors are translated into these at the adapters."""

from __future__ import annotations


class OtelWorkerError(Exception):
    """Base class of otelworker's errors."""


class ConfigError(OtelWorkerError):
    """A setting is missing or invalid; the message names the key."""


class StagingUnavailable(OtelWorkerError):
    """The staging database could not take the payload; nothing was acknowledged."""


class StagingRefused(StagingUnavailable):
    """The database refused the data itself (a data error: SQLSTATE class 22 or 23, or a
    value the driver cannot encode): the same data can never be stored, so retrying is
    useless. A StagingUnavailable, so that a caller that does not tell them apart still
    treats it as "not stored"."""


class ObjectStoreError(OtelWorkerError):
    """The object store refused or failed an operation.

    ``refused``: the store answered that this request itself is invalid (an object it
    will not take), which retrying the same request cannot cure. False for an outage: the
    store unreachable, timed out, failing (5xx), throttling, or refusing the credentials
    or the bucket, which is the same for every request and passes.
    """

    refused: bool = False


class BadPayload(OtelWorkerError):
    """A payload is not a valid OTLP request of its signal."""
