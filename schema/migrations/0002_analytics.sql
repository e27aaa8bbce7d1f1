-- Platform events, each stored once, and per-day counts kept in the same transaction.
CREATE TABLE analytics_events (
    event_id    text PRIMARY KEY,
    type        text NOT NULL,
    mailbox_id  text NOT NULL,
    campaign_id text,
    message_id  text,
    occurred_at timestamptz NOT NULL,
    properties  jsonb NOT NULL DEFAULT '{}'::jsonb,
    job_id      text,
    recorded_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX analytics_events_mailbox_idx ON analytics_events (mailbox_id, occurred_at);

CREATE TABLE analytics_daily_mailbox (
    day        date NOT NULL,
    mailbox_id text NOT NULL,
    type       text NOT NULL,
    count      bigint NOT NULL,
    PRIMARY KEY (day, mailbox_id, type)
);

CREATE TABLE analytics_daily_campaign (
    day         date NOT NULL,
    campaign_id text NOT NULL,
    type        text NOT NULL,
    count       bigint NOT NULL,
    PRIMARY KEY (day, campaign_id, type)
);
