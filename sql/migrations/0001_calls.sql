-- pbx-bridge 0001: call records, call legs, and the CEL table Asterisk writes.
-- Applied by `pbx-bridge migrate` inside one transaction.

CREATE TABLE calls (
    linkedid           text PRIMARY KEY,
    did                text NOT NULL,
    trunk              text NOT NULL,
    caller_number      text NOT NULL DEFAULT '',
    caller_name        text NOT NULL DEFAULT '',
    started_at         timestamptz NOT NULL,
    ring_started_at    timestamptz,
    answered_at        timestamptz,
    ended_at           timestamptz,
    ring_seconds       numeric(10, 3),
    rings              integer CHECK (rings >= 0),
    within_ring_limit  boolean,
    answered_by        text,
    disposition        text CHECK (disposition IN
                         ('answered', 'abandoned', 'missed', 'forwarded', 'forward_missed', 'voicemail')),
    after_hours        boolean,
    talk_seconds       numeric(10, 3),
    hangup_cause       smallint,
    hangup_cause_text  text,
    is_probe           boolean NOT NULL DEFAULT false,
    source             text NOT NULL CHECK (source IN ('ami', 'cel', 'reconcile')),
    created_at         timestamptz NOT NULL DEFAULT now(),
    updated_at         timestamptz NOT NULL DEFAULT now(),
    CHECK (ended_at IS NULL OR disposition IS NOT NULL)
);
CREATE INDEX calls_started_at ON calls (started_at);
CREATE INDEX calls_caller_number ON calls (caller_number);

COMMENT ON TABLE calls IS '400 热线来电记录,每通电话一行 / one row per hotline call (unique linkedid)';

CREATE TABLE call_legs (
    linkedid          text NOT NULL REFERENCES calls (linkedid) ON DELETE CASCADE,
    uniqueid          text NOT NULL,
    channel           text NOT NULL,
    endpoint          text NOT NULL,
    dial_started_at   timestamptz,
    ring_started_at   timestamptz,
    answered_at       timestamptz,
    ended_at          timestamptz,
    dial_status       text,
    hangup_cause      smallint,
    hangup_cause_text text,
    PRIMARY KEY (linkedid, uniqueid)
);

COMMENT ON TABLE call_legs IS '每通来电振铃的坐席分机 / one row per outbound leg (agent phone) of a call';

-- Asterisk's cel_pgsql writes here (dialplan/cel_pgsql.conf, usegmtime = yes):
-- eventtime is UTC without a zone, as cel_pgsql formats it.
CREATE TABLE cel (
    id           bigserial PRIMARY KEY,
    eventtype    text NOT NULL,
    eventtime    timestamp NOT NULL,
    userdeftype  text NOT NULL DEFAULT '',
    cid_name     text NOT NULL DEFAULT '',
    cid_num      text NOT NULL DEFAULT '',
    cid_ani      text NOT NULL DEFAULT '',
    cid_rdnis    text NOT NULL DEFAULT '',
    cid_dnid     text NOT NULL DEFAULT '',
    exten        text NOT NULL DEFAULT '',
    context      text NOT NULL DEFAULT '',
    channame     text NOT NULL DEFAULT '',
    appname      text NOT NULL DEFAULT '',
    appdata      text NOT NULL DEFAULT '',
    accountcode  text NOT NULL DEFAULT '',
    peeraccount  text NOT NULL DEFAULT '',
    uniqueid     text NOT NULL DEFAULT '',
    linkedid     text NOT NULL DEFAULT '',
    amaflags     integer NOT NULL DEFAULT 0,
    userfield    text NOT NULL DEFAULT '',
    peer         text NOT NULL DEFAULT '',
    extra        text NOT NULL DEFAULT ''
);
CREATE INDEX cel_linkedid ON cel (linkedid);
CREATE INDEX cel_eventtime ON cel (eventtime);

COMMENT ON TABLE cel IS 'Asterisk CEL 原始事件(cel_pgsql 写入,UTC)/ raw channel events written by Asterisk (UTC)';
