"""The queue handlers: one module per queue, each with its payload's handler and policy."""
