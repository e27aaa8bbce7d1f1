-- Outbound queues: every webhook delivery attempt, the warmup plan of each mailbox and day,
-- and the indexes the sending, warmup and webhook handlers look up by.
CREATE TABLE webhook_deliveries (
    id          bigserial PRIMARY KEY,
    endpoint_id text NOT NULL,
    webhook_id  text NOT NULL,       -- the Standard Webhooks `webhook-id`, stable across retries
    event_type  text NOT NULL,
    job_id      text NOT NULL,
    attempt     integer NOT NULL,
    status_code integer,             -- NULL: no response (refused, network error, timeout)
    latency_ms  integer,
    succeeded   boolean NOT NULL DEFAULT false,
    error       text,
    at          timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX webhook_deliveries_webhook_idx ON webhook_deliveries (webhook_id, endpoint_id);
CREATE INDEX webhook_deliveries_endpoint_idx ON webhook_deliveries (endpoint_id, at);

-- One row per planned warmup message: (mailbox, day, n) is also its job id, so planning
-- the same day twice adds nothing; `published` lets a crashed run publish what it missed.
CREATE TABLE warmup_sends (
    mailbox_id      text NOT NULL,
    day             date NOT NULL,
    n               integer NOT NULL,
    peer_mailbox_id text NOT NULL,
    job_id          text NOT NULL UNIQUE,
    published       boolean NOT NULL DEFAULT false,
    planned_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (mailbox_id, day, n)
);

-- The recent bounce rate of a mailbox (warmup pause) reads its rows of the last days.
CREATE INDEX outbound_messages_created_idx ON outbound_messages (mailbox_id, created_at);
