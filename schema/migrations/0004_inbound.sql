-- Inbound mail (email:processing) and bounce outcomes (bounce).

-- One row per message received by a platform mailbox, stored once by (mailbox, message_id).
CREATE TABLE inbound_messages (
    id             bigserial PRIMARY KEY,
    mailbox_id     text NOT NULL,
    message_id     text NOT NULL,    -- Message-ID without angle brackets; when absent (or too
                                     -- long to index): 'sha256:<hex digest of the raw bytes>'
    has_message_id boolean NOT NULL, -- false: message_id is the digest key
    raw_sha256     text NOT NULL,
    size_bytes     integer NOT NULL,
    in_reply_to    text,
    reference_ids  text[] NOT NULL DEFAULT '{}',  -- the References header, in order
    from_addr      text,             -- the From header as displayed
    from_email     text,             -- its bare address, lower-cased
    to_addrs       text[] NOT NULL DEFAULT '{}',
    cc_addrs       text[] NOT NULL DEFAULT '{}',
    subject        text,
    date           timestamptz,      -- the Date header, when it parses
    text_body      text,
    html_body      text,
    attachments    jsonb NOT NULL DEFAULT '[]'::jsonb,  -- [{"filename","content_type","size"}]
    headers        jsonb NOT NULL DEFAULT '{}'::jsonb,  -- the headers the classifier reads
    defects        text[] NOT NULL DEFAULT '{}',
    classification text NOT NULL
        CHECK (classification IN ('bounce', 'auto_reply', 'warmup', 'reply', 'other')),
    received_at    timestamptz NOT NULL,
    job_id         text,
    stored_at      timestamptz NOT NULL DEFAULT now(),
    UNIQUE (mailbox_id, message_id)
);
CREATE INDEX inbound_messages_received_idx ON inbound_messages (mailbox_id, received_at);
CREATE INDEX inbound_messages_classification_idx
    ON inbound_messages (classification, received_at);

-- Every recipient a bounce reported, hard, soft or unknown, sender-side or not.
CREATE TABLE bounce_recipients (
    job_id              text NOT NULL,
    address             text NOT NULL,   -- lower-cased
    kind                text NOT NULL CHECK (kind IN ('hard', 'soft', 'unknown')),
    sender_side         boolean NOT NULL DEFAULT false,  -- 5.7.x / policy: not the recipient's
    status              text,
    diagnostic          text,
    action              text,
    remote_mta          text,
    original_message_id text,            -- the bounced outbound message, without angle brackets
    mailbox_id          text,
    bounced_at          timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (job_id, address)
);
CREATE INDEX bounce_recipients_address_idx ON bounce_recipients (address, bounced_at);

-- Soft bounces counted per address: N within the window suppress it.
CREATE TABLE soft_bounces (
    address     text NOT NULL,           -- lower-cased
    job_id      text NOT NULL,
    status      text,
    diagnostic  text,
    sender_side boolean NOT NULL DEFAULT false,  -- greylisting and the like: not counted
    bounced_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (job_id, address)
);
CREATE INDEX soft_bounces_address_idx ON soft_bounces (address, bounced_at);
