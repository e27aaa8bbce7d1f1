"""jobstream: a background-job engine on Redis Streams and PostgreSQL, and the email platform's
queues on it. `jobstream.streams` is the engine, `jobstream.schema` the contracts,
`jobstream.consumers` the application, `jobstream.otel` tracing, metrics and logs."""
