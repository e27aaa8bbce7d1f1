-- Job status (the source of truth) and one row per attempt.
CREATE TABLE jobs (
    id              text PRIMARY KEY,
    queue           text NOT NULL,
    status          text NOT NULL
        CHECK (status IN ('queued', 'running', 'retrying', 'completed', 'failed')),
    payload         jsonb,
    result          jsonb,
    error           text,
    attempts        integer NOT NULL DEFAULT 0,
    worker_id       text,
    stream_entry_id text,
    created_at      timestamptz NOT NULL DEFAULT now(),
    started_at      timestamptz,
    completed_at    timestamptz,
    updated_at      timestamptz NOT NULL DEFAULT now(),
    next_attempt_at timestamptz
);
CREATE INDEX jobs_queue_status_idx ON jobs (queue, status);

CREATE TABLE job_executions (
    id          bigserial PRIMARY KEY,
    job_id      text NOT NULL,
    attempt     integer NOT NULL,
    outcome     text NOT NULL,
    error       text,
    duration_ms integer NOT NULL,
    worker_id   text NOT NULL,
    started_at  timestamptz NOT NULL,
    finished_at timestamptz NOT NULL
);
CREATE INDEX job_executions_job_idx ON job_executions (job_id, attempt);
