# The gateway as a container: `docker compose up` (docker-compose.yml) runs it next to
# PostgreSQL. Without PGQG_DSN it would start its embedded PostgreSQL instead.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app
COPY pyproject.toml README.md ./
COPY gateway ./gateway
COPY sql ./sql
RUN pip install .

# The package is installed into site-packages; the SQL files stay here. Listen on every
# interface so that the published port reaches the gateway.
ENV PGQG_SQL_DIR=/app/sql \
    PGQG_HOST=0.0.0.0 \
    PGQG_PORT=8080
EXPOSE 8080

CMD ["pgqg", "serve"]
