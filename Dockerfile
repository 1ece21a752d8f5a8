# syntax=docker/dockerfile:1
# The reponotify operator and receiver: `reponotify operator` (kopf standalone, one pod).
# Receiver on 8080 (/v1/events, /healthz, /readyz, /metrics), kopf's liveness on 8081 (/healthz).

ARG PYTHON_IMAGE=python:3.12-slim-bookworm

# Build stage: reponotify and its dependencies installed into a virtualenv at /opt/reponotify.
# Everything comes as wheels; whatever a build needs stays in this stage.
FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/reponotify
WORKDIR /src
COPY pyproject.toml README.md ./
COPY operator ./operator
# pip compiles the byte code here, so the read-only root file system needs no writes later.
RUN /opt/reponotify/bin/pip install --only-binary=:all: --no-binary=reponotify . \
    && /opt/reponotify/bin/pip uninstall --yes pip

# Final stage: the same base (the virtualenv points at its python), the virtualenv, a non-root user.
FROM ${PYTHON_IMAGE}
RUN groupadd --system --gid 10001 reponotify \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
               --shell /usr/sbin/nologin reponotify \
    && mkdir -p /var/lib/reponotify \
    && chown 10001:10001 /var/lib/reponotify
COPY --from=build /opt/reponotify /opt/reponotify
ENV PATH=/opt/reponotify/bin:$PATH \
    REPONOTIFY_STATE_DIR=/var/lib/reponotify \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
# The state (durable outbox): mount a volume here to keep it across container restarts.
VOLUME ["/var/lib/reponotify"]
WORKDIR /var/lib/reponotify
USER 10001:10001
EXPOSE 8080 8081
ENTRYPOINT ["reponotify"]
CMD ["operator"]
