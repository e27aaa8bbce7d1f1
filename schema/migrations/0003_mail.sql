-- Tables shared by several mail queues: mailboxes, what was sent, who is suppressed,
-- warmup stats, and the customers' webhook endpoints (read by emit()).
CREATE TABLE mailboxes (
    id                text PRIMARY KEY,
    address           text NOT NULL UNIQUE,
    display_name      text,
    smtp_url          text,          -- relay with credentials; NULL: the default relay (SMTP_URL)
    daily_limit       integer NOT NULL DEFAULT 500 CHECK (daily_limit >= 0),
    per_minute_limit  integer NOT NULL DEFAULT 20 CHECK (per_minute_limit >= 0),
    warmup_enabled    boolean NOT NULL DEFAULT false,
    warmup_started_on date,
    status            text NOT NULL DEFAULT 'active' CHECK (status IN ('active', 'paused')),
    created_at        timestamptz NOT NULL DEFAULT now(),
    updated_at        timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE outbound_messages (
    message_id  text PRIMARY KEY,    -- RFC 5322 Message-ID, without angle brackets
    job_id      text UNIQUE,
    mailbox_id  text NOT NULL,
    recipients  text[] NOT NULL,
    subject     text,
    campaign_id text,
    is_warmup   boolean NOT NULL DEFAULT false,
    status      text NOT NULL CHECK (status IN ('sending', 'sent', 'failed', 'bounced')),
    smtp_reply  text,
    created_at  timestamptz NOT NULL DEFAULT now(),
    sent_at     timestamptz,
    bounced_at  timestamptz
);
CREATE INDEX outbound_messages_mailbox_idx ON outbound_messages (mailbox_id, sent_at);

CREATE TABLE suppressions (
    address       text PRIMARY KEY,  -- lower-cased
    reason        text NOT NULL,
    source_job_id text,
    first_seen    timestamptz NOT NULL DEFAULT now(),
    last_seen     timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE warmup_daily (
    mailbox_id text NOT NULL,
    day        date NOT NULL,
    target     integer NOT NULL DEFAULT 0,
    sent       integer NOT NULL DEFAULT 0,
    received   integer NOT NULL DEFAULT 0,
    replied    integer NOT NULL DEFAULT 0,
    PRIMARY KEY (mailbox_id, day)
);

CREATE TABLE webhook_endpoints (
    id              text PRIMARY KEY,
    url             text NOT NULL,
    secret          text NOT NULL,   -- whsec_<base64>
    event_types     text[] NOT NULL,
    active          boolean NOT NULL DEFAULT true,
    disabled_reason text,
    created_at      timestamptz NOT NULL DEFAULT now()
);
