# The project image: every `jobstream` command; configured only by environment variables.
# Dependencies come only from requirements.lock (exact versions, each file checked against
# its hash; regenerate it with scripts/lock), then the project itself, resolving nothing.
FROM python:3.11.15-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app
COPY requirements.lock ./
RUN pip install --require-hashes -r requirements.lock
COPY pyproject.toml README.md ./
COPY schema ./schema
COPY streams ./streams
COPY consumers ./consumers
COPY otel ./otel
COPY jobstream ./jobstream
RUN pip install --no-deps --no-build-isolation . \
    && pip check \
    && useradd --system --uid 10001 --no-create-home jobstream

USER jobstream
CMD ["jobstream", "worker"]
