"""Tables and counters queues share: mailboxes, suppressions, send limits, webhook endpoints."""
