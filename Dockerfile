# The project image: every `jobstream` command; configured only by environment variables.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app
COPY pyproject.toml README.md ./
COPY schema ./schema
COPY streams ./streams
COPY consumers ./consumers
COPY otel ./otel
RUN pip install . \
    && useradd --system --uid 10001 --no-create-home jobstream

USER jobstream
CMD ["jobstream", "worker"]
