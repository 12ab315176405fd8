# syntax=docker/dockerfile:1
# otelworker's container image (docs/deploy.md):
#   docker build -t otelworker .
#   docker run --rm -p 4318:4318 -p 4317:4317 -e DATABASE_URL=postgresql://... \
#     -e S3_BUCKET=... otelworker                      # = python -m otelworker serve
#   docker run --rm -e DATABASE_URL=... otelworker migrate   # or requeue-dead, gc-orphans
#
# Stage 1 builds wheels: otelworker's own and one for every dependency, so that whatever
# a platform lacks a prebuilt wheel for is compiled here, never in the final image.
# Stage 2 installs them offline (--no-index) into a clean python:3.11-slim: no build
# tools, no pip cache, no source tree, no wheel files left in a layer (they come through a
# bind mount of stage 1, not a COPY).

FROM python:3.11-slim AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1
# A C compiler for otelworker's one compiled module (otelworker/_wire.c, setup.py): it is
# optional to the build, so without one the wheel would silently lack it and the door's
# time range and the compactor would take their slower Python paths.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml setup.py README.md ./
COPY otelworker ./otelworker
# The parquet extra (pyarrow, DuckDB) for ROLE=compactor, compact and query.
RUN pip wheel --no-cache-dir --wheel-dir /wheels '.[parquet]'

FROM python:3.11-slim
# UID/GID 10001: outside the range of the base image's users and of most hosts' users;
# deploy/kubernetes sets runAsUser/runAsGroup to the same numbers.
ARG UID=10001
ARG GID=10001
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1
RUN groupadd --system --gid "${GID}" otelworker \
    && useradd --system --uid "${UID}" --gid otelworker --no-create-home \
        --home-dir /var/lib/otelworker --shell /usr/sbin/nologin otelworker \
    && install -d -o otelworker -g otelworker -m 0750 /var/lib/otelworker
# The wheels are versioned by pyproject.toml and were resolved in stage 1; nothing is
# fetched here (--no-index), so there is no version to pin on this line.
# hadolint ignore=DL3013
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    pip install --no-cache-dir --no-index --find-links=/wheels 'otelworker[parquet]' \
    && python -c "import otelworker.app, otelworker.front.server, otelworker.ingress.grpc_server, uvloop, pyarrow, duckdb, otelworker.columnar.compact, otelworker._wire"
# The working directory is where relative defaults land (.env is read from here;
# LOCAL_OBJECT_DIR and EMBEDDED_DB_DIR default to ./.otelworker/...), owned by the user.
WORKDIR /var/lib/otelworker
USER ${UID}:${GID}
EXPOSE 4318 4317
# Liveness only (/healthz touches no database); the slim image has no curl. The port is
# the one the service binds: OTEL_PORT or PORT (the prefixed key wins), else 4318.
HEALTHCHECK --interval=10s --timeout=3s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request as u; p = os.environ.get('OTEL_PORT') or os.environ.get('PORT') or '4318'; u.urlopen('http://127.0.0.1:' + p + '/healthz', timeout=2)"]
# `docker run IMAGE` serves; `docker run IMAGE migrate|requeue-dead|gc-orphans ...`
# runs an admin command with the same settings.
ENTRYPOINT ["python", "-m", "otelworker"]
CMD ["serve"]
