"""The worker runtime: settings, deps, handler registry, events, health, TLS, the parse pool."""
