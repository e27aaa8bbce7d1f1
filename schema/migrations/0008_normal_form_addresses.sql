-- Suppressions and soft bounces were keyed by the address as written, so `<victim@x.com>`,
-- `victim@x.com (comment)`, `x <victim@x.com>` or `"victim"@x.com` stood apart from
-- `victim@x.com`. Rewrite each into the normal form the handlers now use
-- (consumers/addresses.py: no display name, comment, angle brackets or needless quotes,
-- all lower-case), merging the rows that become one address. An internationalised domain
-- needs IDNA, which SQL lacks: such a row keeps its lower-cased form.
CREATE FUNCTION pg_temp.normal_address(address text) RETURNS text
LANGUAGE plpgsql IMMUTABLE AS $$
DECLARE
    a text := btrim(address);
BEGIN
    IF a ~ '<[^<>]*@[^<>]*>' THEN
        a := substring(a FROM '<([^<>]*@[^<>]*)>');
    END IF;
    a := regexp_replace(a, '^@[^:]*:', '');                     -- obsolete source route
    a := btrim(regexp_replace(a, '\([^()"]*\)', '', 'g'));      -- comments
    IF a ~ '^"[A-Za-z0-9!#$%&''*+/=?^_`{|}~-]+(\.[A-Za-z0-9!#$%&''*+/=?^_`{|}~-]+)*"@' THEN
        a := regexp_replace(a, '^"([^"]*)"@', '\1@');           -- quotes it does not need
    END IF;
    RETURN lower(a);
END
$$;

CREATE TEMP TABLE renamed_suppressions ON COMMIT DROP AS
SELECT pg_temp.normal_address(address) AS normal, address, reason, source_job_id, first_seen,
       last_seen
FROM suppressions
WHERE address <> pg_temp.normal_address(address);

DELETE FROM suppressions s USING renamed_suppressions r WHERE s.address = r.address;

-- The earliest suppression of an address keeps its reason and source job; last_seen is
-- the latest of them.
INSERT INTO suppressions AS s (address, reason, source_job_id, first_seen, last_seen)
SELECT DISTINCT ON (normal) normal, reason, source_job_id, first_seen,
       max(last_seen) OVER (PARTITION BY normal)
FROM renamed_suppressions
ORDER BY normal, first_seen, address
ON CONFLICT (address) DO UPDATE SET
    reason = CASE WHEN EXCLUDED.first_seen < s.first_seen THEN EXCLUDED.reason ELSE s.reason END,
    source_job_id = CASE WHEN EXCLUDED.first_seen < s.first_seen
                         THEN EXCLUDED.source_job_id ELSE s.source_job_id END,
    first_seen = least(s.first_seen, EXCLUDED.first_seen),
    last_seen = greatest(s.last_seen, EXCLUDED.last_seen);

-- Soft bounces are counted per address: one job's rows for two spellings become one.
CREATE TEMP TABLE renamed_soft_bounces ON COMMIT DROP AS
SELECT pg_temp.normal_address(address) AS normal, address, job_id, status, diagnostic,
       sender_side, bounced_at
FROM soft_bounces
WHERE address <> pg_temp.normal_address(address);

DELETE FROM soft_bounces s USING renamed_soft_bounces r
WHERE s.job_id = r.job_id AND s.address = r.address;

INSERT INTO soft_bounces (address, job_id, status, diagnostic, sender_side, bounced_at)
SELECT normal, job_id, status, diagnostic, sender_side, bounced_at FROM renamed_soft_bounces
ON CONFLICT (job_id, address) DO NOTHING;

DROP FUNCTION pg_temp.normal_address(text);
