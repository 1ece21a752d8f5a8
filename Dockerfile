# syntax=docker/dockerfile:1
# Build stage: a wheel of reponotify and its dependencies.
FROM python:3.12-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY operator ./operator
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

# Final stage: no compilers, no pip cache, a non-root user.
FROM python:3.12-slim
RUN useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin reponotify
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir --no-index --find-links=/wheels reponotify && rm -rf /wheels
USER 10001
ENV REPONOTIFY_STATE_DIR=/var/lib/reponotify PYTHONUNBUFFERED=1
EXPOSE 8080 8081
ENTRYPOINT ["reponotify"]
CMD ["operator"]
