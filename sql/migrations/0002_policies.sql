-- pbx-bridge 0002: what the hotline policies record.

ALTER TABLE calls
    ADD COLUMN answered_stage   text CHECK (answered_stage IN ('group', 'escalation', 'mobile')),
    ADD COLUMN forwarded_to     text,
    ADD COLUMN duty_holder      text,
    ADD COLUMN needs_call_sheet boolean NOT NULL DEFAULT false;

COMMENT ON COLUMN calls.answered_stage IS '接听环节 / which stage answered: group (three rings), escalation (all phones), mobile (duty mobile)';
COMMENT ON COLUMN calls.forwarded_to IS '转接的客服手机号 / the duty mobile the call was forwarded to';
COMMENT ON COLUMN calls.duty_holder IS '当时保管客服手机的人 / who held the duty mobile';
COMMENT ON COLUMN calls.needs_call_sheet IS '手机接听,需事后补录接听记录单 / answered on the mobile: the call sheet must be filled in afterwards';

-- Who holds the duty mobile when. The configured [duty] mobile is the default when no row applies.
CREATE TABLE duty_roster (
    id         bigserial PRIMARY KEY,
    holder     text NOT NULL CHECK (length(holder) BETWEEN 1 AND 100),
    mobile     text NOT NULL CHECK (mobile ~ '^[0-9]{5,20}$'),
    starts_at  timestamptz NOT NULL,
    ends_at    timestamptz NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    CHECK (ends_at > starts_at)
);
CREATE INDEX duty_roster_period ON duty_roster (starts_at, ends_at);
COMMENT ON TABLE duty_roster IS '客服手机值班表 / duty mobile roster';

CREATE TABLE policy_violations (
    id          bigserial PRIMARY KEY,
    kind        text NOT NULL CHECK (kind IN ('ring_limit', 'outbound_attempt', 'unanswered')),
    linkedid    text,
    occurred_at timestamptz NOT NULL,
    details     jsonb NOT NULL DEFAULT '{}',
    recorded_at timestamptz NOT NULL DEFAULT now()
);
-- one violation of a kind per call (replays are idempotent); outbound attempts are per channel
CREATE UNIQUE INDEX policy_violations_once
    ON policy_violations (kind, (coalesce(linkedid, '')), (coalesce(details ->> 'channel', '')));
CREATE INDEX policy_violations_time ON policy_violations (occurred_at);
COMMENT ON TABLE policy_violations IS '违规记录:超过三响、外拨尝试、未接 / rule breaches: ring limit, outbound attempts, unanswered';
