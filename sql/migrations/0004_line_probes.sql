-- pbx-bridge 0004: line health probes (test calls through the carrier back to the 400 number).
CREATE TABLE line_probes (
    id          bigserial PRIMARY KEY,
    probe_id    text NOT NULL,                 -- one request (API id); a retry is a second attempt
    attempt     smallint NOT NULL CHECK (attempt >= 1),
    trigger     text NOT NULL CHECK (trigger IN ('quiet', 'daily', 'manual')),
    number      text NOT NULL,
    started_at  timestamptz NOT NULL,
    finished_at timestamptz NOT NULL,
    outcome     text NOT NULL CHECK (outcome IN ('ok', 'no_arrival', 'dial_failed', 'timeout')),
    delay_ms    integer,                       -- dial to arrival on the hotline trunk
    reason      text,                          -- Asterisk's OriginateResponse reason / detail
    linkedid    text,                          -- the arriving call (calls.is_probe)
    UNIQUE (probe_id, attempt)
);
CREATE INDEX line_probes_started_at ON line_probes (started_at);
COMMENT ON TABLE line_probes IS '线路测拨记录 / line health probes: each attempt, its outcome and the dial-to-arrival delay';
