"""Which S3 errors are the object's (counted toward its rows' attempts) and which an outage."""

from __future__ import annotations

import pytest
from botocore.exceptions import ClientError, EndpointConnectionError

from otelworker.sinks.s3 import _error


def client_error(status: int, code: str) -> ClientError:
    return ClientError(
        {"Error": {"Code": code, "Message": "m"}, "ResponseMetadata": {"HTTPStatusCode": status}},
        "PutObject",
    )


@pytest.mark.parametrize(
    ("status", "code"),
    [(400, "InvalidArgument"), (400, "EntityTooLarge"), (400, "BadDigest"), (413, "TooBig")],
)
def test_the_store_refusing_the_object_counts(status: int, code: str) -> None:
    err = _error("put", "k", client_error(status, code))
    assert err.refused and err.reason == code  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("status", "code"),
    [
        (500, "InternalError"),
        (503, "SlowDown"),
        (503, "ServiceUnavailable"),
        (400, "RequestTimeout"),
        (400, "ExpiredToken"),
        (403, "AccessDenied"),
        (403, "SignatureDoesNotMatch"),
        (404, "NoSuchBucket"),
        (429, "TooManyRequests"),
    ],
)
def test_an_outage_or_a_setting_does_not_count(status: int, code: str) -> None:
    assert not _error("put", "k", client_error(status, code)).refused


def test_no_answer_does_not_count() -> None:
    assert not _error("put", "k", EndpointConnectionError(endpoint_url="http://s3")).refused
    assert not _error("put", "k", TimeoutError()).refused
