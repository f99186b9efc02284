-- pbx-bridge 0011: a day's break (签出休息) over [presence] break_minutes_per_day is a breach,
-- recorded once per agent and local day, the moment it passes (issue 15).

ALTER TABLE policy_violations DROP CONSTRAINT policy_violations_kind_check;
ALTER TABLE policy_violations ADD CONSTRAINT policy_violations_kind_check
    CHECK (kind IN ('ring_limit', 'outbound_attempt', 'unanswered', 'complaint_overdue', 'break_over_limit'));
COMMENT ON TABLE policy_violations IS '违规记录:超过三响、外拨尝试、未接、投诉超时未处理、签出休息超时 / rule breaches: ring limit, outbound attempts, unanswered calls, complaints not resolved in time, breaks over the daily limit';

-- once per agent and local day
CREATE UNIQUE INDEX policy_violations_break_once
    ON policy_violations ((details ->> 'agent'), (details ->> 'day')) WHERE kind = 'break_over_limit';

CREATE OR REPLACE FUNCTION pbx_violation_label(kind text) RETURNS text
    LANGUAGE sql IMMUTABLE PARALLEL SAFE
    RETURN CASE kind
        WHEN 'ring_limit' THEN '超过三响未接'
        WHEN 'outbound_attempt' THEN '400线路外拨'
        WHEN 'unanswered' THEN '来电无人接听'
        WHEN 'complaint_overdue' THEN '投诉超时未处理'
        WHEN 'break_over_limit' THEN '签出休息超时'
        ELSE kind END;

-- The agent a break breach is about is its subject.
CREATE OR REPLACE VIEW v_violations AS
SELECT (v.occurred_at AT TIME ZONE z.timezone)::timestamp(0) AS occurred,
       coalesce((c.started_at AT TIME ZONE z.timezone)::date, (v.occurred_at AT TIME ZONE z.timezone)::date) AS day,
       v.kind,
       pbx_violation_label(v.kind) AS violation,
       c.caller_number,
       c.caller_name,
       c.answered_by,
       coalesce(v.details ->> 'digits', v.details ->> 'owner', v.details ->> 'agent') AS subject,
       v.details,
       v.linkedid,
       v.id
FROM policy_violations v
CROSS JOIN bridge_zone z
LEFT JOIN calls c ON c.linkedid = v.linkedid
WHERE NOT coalesce(c.is_probe, false)
ORDER BY v.occurred_at DESC, v.id DESC;

COMMENT ON COLUMN v_violations.kind IS '违规类型代码:ring_limit, unanswered, outbound_attempt, complaint_overdue, break_over_limit / kind code';
COMMENT ON COLUMN v_violations.subject IS '外拨号码、投诉跟进人或签出超时的坐席 / digits dialled out, the complaint''s owner, or the agent whose break ran over';
