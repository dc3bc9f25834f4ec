# The gateway as a container: `docker compose up` (docker-compose.yml) runs it next to
# PostgreSQL. Without PGQG_DSN it would start its embedded PostgreSQL instead.

# Build stage: the full image has the C compiler and Python headers that mypyc's
# compiled modules need (see gateway/_build.py); the runtime image gets only the wheel.
FROM python:3.11 AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml setup.py README.md ./
COPY gateway ./gateway
RUN pip wheel --no-deps --wheel-dir /wheels .

FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app
COPY --from=build /wheels /wheels
RUN pip install /wheels/*.whl && rm -rf /wheels
COPY sql ./sql

# The package is installed into site-packages; the SQL files stay here. Listen on every
# interface so that the published port reaches the gateway.
ENV PGQG_SQL_DIR=/app/sql \
    PGQG_HOST=0.0.0.0 \
    PGQG_PORT=8080
EXPOSE 8080

CMD ["pgqg", "serve"]
