-- pbx-bridge 0009: call flows as the rules describe them (issue 11): the caller's wait, the duty
-- mobile's ring time and ring limit, transfers (each a leg; who ended up with the caller), and
-- talk per person. Views gain columns at their end; v_agent_daily is rebuilt (per person).

ALTER TABLE calls
    ADD COLUMN wait_seconds             numeric(10, 3) CHECK (wait_seconds >= 0),
    ADD COLUMN mobile_ring_seconds      numeric(10, 3) CHECK (mobile_ring_seconds >= 0),
    ADD COLUMN mobile_within_ring_limit boolean,
    ADD COLUMN transferred_to           text;

COMMENT ON COLUMN calls.wait_seconds IS '来电方等待时长(秒):从来电到有人接听(坐席、同事或客服手机),无人接听则到结束 / the caller''s wait: from the call''s start to the answer by a person, else to its end';
COMMENT ON COLUMN calls.mobile_ring_seconds IS '客服手机振铃时长(秒):从手机振铃(运营商180/183,无则从拨出)到接听或放弃 / the duty mobile''s ring time: from its ringing (180/183 from the carrier, else its dial) to answer or giving up';
COMMENT ON COLUMN calls.mobile_within_ring_limit IS '客服手机是否三响内接听(空:未转手机,或手机未响满三响) / the duty mobile answered within the ring limit (null: no forward, or it stopped before the limit)';
ALTER TABLE call_legs
    ADD COLUMN stage          text,
    ADD COLUMN transfer_kind  text CHECK (transfer_kind IN ('blind', 'attended')),
    ADD COLUMN transferred_by text,
    ADD COLUMN talk_seconds   numeric(10, 3) CHECK (talk_seconds >= 0),
    ADD COLUMN transferred_at timestamptz;

COMMENT ON COLUMN call_legs.stage IS '振铃环节:group 组振, escalation 全员, mobile 客服手机, transfer 转接同事, transfer_return 转接未接回到原坐席 / what rang this leg';
COMMENT ON COLUMN call_legs.transfer_kind IS '转接方式:blind 直接转, attended 咨询后转 / how the call was transferred to this leg';
COMMENT ON COLUMN call_legs.transferred_by IS '发起转接的坐席 / the agent who transferred the caller to this leg (or back)';
COMMENT ON COLUMN call_legs.transferred_at IS '咨询转接:此人接过来电方的时间(通话从此算起)/ an attended transfer: when this person, answered in the consultation, was given the caller';
COMMENT ON COLUMN call_legs.talk_seconds IS '此人与来电方的通话时长(秒)/ this person''s talk with the caller, seconds';

-- Legs recorded before this version: the person who answered talked until the leg or the call ended.
UPDATE call_legs l
   SET talk_seconds = round(greatest(extract(epoch FROM least(l.ended_at, c.ended_at) - l.answered_at), 0), 3)
  FROM calls c
 WHERE c.linkedid = l.linkedid AND l.answered_at IS NOT NULL AND c.ended_at IS NOT NULL AND l.talk_seconds IS NULL;

COMMENT ON COLUMN calls.transferred_to IS '转接后最终接听的同事 / who had the caller at the end, after transfers';

CREATE OR REPLACE VIEW call_facts AS
SELECT c.linkedid, c.did, c.caller_number, c.caller_name, c.started_at, c.ring_started_at, c.answered_at,
       c.ended_at, c.ring_seconds, c.rings, c.within_ring_limit, c.answered_by, c.answered_stage,
       c.disposition, c.after_hours, c.talk_seconds, c.forwarded_to, c.duty_holder, c.hangup_cause,
       c.hangup_cause_text, c.source,
       (c.started_at AT TIME ZONE z.timezone) AS local_started,
       (c.started_at AT TIME ZONE z.timezone)::date AS local_day,
       (c.ended_at AT TIME ZONE z.timezone) AS local_ended,
       c.disposition = 'forwarded' AS on_mobile,
       n.linkedid IS NOT NULL AS has_sheet,
       n.category AS sheet_category,
       n.status AS sheet_status,
       pbx_number_key(c.caller_number) AS caller_key,
       c.wait_seconds, c.mobile_ring_seconds, c.mobile_within_ring_limit, c.transferred_to
FROM calls c
CROSS JOIN bridge_zone z
LEFT JOIN call_notes n ON n.linkedid = c.linkedid
WHERE NOT c.is_probe;

CREATE OR REPLACE VIEW v_call_log AS
SELECT f.local_started::timestamp(0) AS started,
       f.local_day AS day,
       f.did AS hotline_number,
       f.caller_number,
       f.caller_name,
       f.after_hours,
       f.disposition,
       pbx_disposition_label(f.disposition) AS result,
       f.answered_by,
       f.answered_stage,
       f.duty_holder,
       f.ring_seconds,
       f.rings,
       f.within_ring_limit,
       f.talk_seconds,
       f.local_ended::timestamp(0) AS ended,
       f.has_sheet,
       f.sheet_category,
       f.sheet_status,
       f.hangup_cause_text AS hangup_cause,
       f.linkedid,
       f.wait_seconds,
       f.mobile_ring_seconds,
       f.mobile_within_ring_limit,
       f.transferred_to,
       (SELECT string_agg(coalesce(l.transferred_by, '?') || ' → ' || l.endpoint
                          || CASE WHEN l.answered_at IS NULL THEN ' (未接)' ELSE '' END, ', '
                          ORDER BY l.dial_started_at, l.uniqueid)
          FROM call_legs l
         WHERE l.linkedid = f.linkedid AND l.stage IN ('transfer', 'transfer_return')) AS transfers
FROM call_facts f
ORDER BY f.started_at DESC;

COMMENT ON COLUMN v_call_log.wait_seconds IS '来电方等待时长(秒)/ the caller''s wait until a person answered (else until the end), seconds';
COMMENT ON COLUMN v_call_log.mobile_ring_seconds IS '客服手机振铃时长(秒)/ seconds the duty mobile rang';
COMMENT ON COLUMN v_call_log.mobile_within_ring_limit IS '客服手机是否三响内接听 / the duty mobile answered within the ring limit';
COMMENT ON COLUMN v_call_log.transferred_to IS '转接后最终接听的同事 / who had the caller at the end, after transfers';
COMMENT ON COLUMN v_call_log.transfers IS '转接经过(转出人 → 转入人,未接注明)/ the transfer chain: who transferred to whom, unanswered marked';

CREATE OR REPLACE VIEW v_daily_kpi AS
WITH per_day AS (
    SELECT local_day AS day,
           count(*) AS calls,
           count(*) FILTER (WHERE answered_at IS NOT NULL) AS answered,
           count(*) FILTER (WHERE within_ring_limit) AS within_limit,
           count(*) FILTER (WHERE within_ring_limit IS NOT NULL) AS limit_applies,
           avg(ring_seconds) FILTER (WHERE answered_at IS NOT NULL AND NOT on_mobile) AS avg_ring,
           percentile_disc(0.9) WITHIN GROUP (ORDER BY ring_seconds)
               FILTER (WHERE answered_at IS NOT NULL AND NOT on_mobile) AS p90_ring,
           count(*) FILTER (WHERE disposition = 'abandoned') AS abandoned,
           count(*) FILTER (WHERE disposition IN ('missed', 'forward_missed', 'voicemail')) AS missed,
           count(*) FILTER (WHERE disposition = 'voicemail') AS voicemail,
           count(*) FILTER (WHERE after_hours) AS after_hours,
           count(*) FILTER (WHERE after_hours AND on_mobile) AS after_hours_mobile_answered,
           avg(talk_seconds) FILTER (WHERE answered_at IS NOT NULL) AS avg_talk,
           count(*) FILTER (WHERE has_sheet) AS sheets,
           count(*) FILTER (WHERE disposition IS NULL AND answered_at IS NULL) AS unfinished,
           avg(wait_seconds) FILTER (WHERE answered_at IS NOT NULL) AS avg_wait,
           percentile_disc(0.9) WITHIN GROUP (ORDER BY wait_seconds) FILTER (WHERE answered_at IS NOT NULL) AS p90_wait,
           count(*) FILTER (WHERE mobile_within_ring_limit) AS mobile_within_limit,
           count(*) FILTER (WHERE mobile_within_ring_limit IS NOT NULL) AS mobile_limit_applies
    FROM call_facts
    GROUP BY local_day
), violations AS (
    SELECT coalesce(f.local_day, (v.occurred_at AT TIME ZONE z.timezone)::date) AS day,
           count(*) FILTER (WHERE v.kind = 'ring_limit') AS ring_limit,
           count(*) FILTER (WHERE v.kind = 'unanswered') AS unanswered,
           count(*) FILTER (WHERE v.kind = 'outbound_attempt') AS outbound_attempt,
           count(*) FILTER (WHERE v.kind = 'complaint_overdue') AS complaint_overdue
    FROM policy_violations v
    CROSS JOIN bridge_zone z
    LEFT JOIN calls c ON c.linkedid = v.linkedid
    LEFT JOIN call_facts f ON f.linkedid = v.linkedid
    WHERE NOT coalesce(c.is_probe, false)
    GROUP BY 1
)
SELECT coalesce(d.day, v.day) AS day,
       coalesce(d.calls, 0) AS calls,
       coalesce(d.answered, 0) AS answered,
       round(100.0 * d.answered / nullif(d.calls, 0), 1) AS answer_rate_pct,
       round(100.0 * d.within_limit / nullif(d.limit_applies, 0), 1) AS within_ring_limit_pct,
       round(d.avg_ring, 1) AS avg_ring_seconds,
       round(d.p90_ring::numeric, 1) AS p90_ring_seconds,
       coalesce(d.abandoned, 0) AS abandoned,
       coalesce(d.missed, 0) AS missed,
       coalesce(d.voicemail, 0) AS voicemail,
       coalesce(d.unfinished, 0) AS unfinished,
       coalesce(d.after_hours, 0) AS after_hours_calls,
       coalesce(d.after_hours_mobile_answered, 0) AS after_hours_mobile_answered,
       round(d.avg_talk, 1) AS avg_talk_seconds,
       coalesce(d.sheets, 0) AS sheets,
       round(100.0 * d.sheets / nullif(d.calls, 0), 1) AS sheet_rate_pct,
       coalesce(v.ring_limit, 0) AS ring_limit_violations,
       coalesce(v.unanswered, 0) AS unanswered_violations,
       coalesce(v.outbound_attempt, 0) AS outbound_attempt_violations,
       coalesce(v.complaint_overdue, 0) AS complaint_overdue_violations,
       round(d.avg_wait, 1) AS avg_wait_seconds,
       round(d.p90_wait::numeric, 1) AS p90_wait_seconds,
       round(100.0 * d.mobile_within_limit / nullif(d.mobile_limit_applies, 0), 1) AS mobile_within_ring_limit_pct
FROM per_day d
FULL JOIN violations v ON v.day = d.day
ORDER BY 1 DESC;

COMMENT ON COLUMN v_daily_kpi.avg_wait_seconds IS '平均等待时长(秒,有人接听的来电)/ average caller wait until a person answered, seconds';
COMMENT ON COLUMN v_daily_kpi.p90_wait_seconds IS '90% 有人接听的来电在此秒数内接听(实际观测值)/ 90 % of answered callers waited at most this long (an observed value)';
COMMENT ON COLUMN v_daily_kpi.mobile_within_ring_limit_pct IS '客服手机三响内接听率 % / share of forwards the duty mobile answered within the ring limit, among those answered or rung past it, in percent';

-- Per person per local day. `answered` counts the calls a person answered first (首问负责制:
-- they own the case); talk is each person's own talk with callers, transferred calls split
-- between the people who had them; transfers made and received (answered) are counted.
DROP VIEW v_agent_daily;
CREATE VIEW v_agent_daily AS
WITH firsts AS (
    SELECT local_day AS day, answered_by AS agent, on_mobile AS duty_mobile, duty_holder,
           count(*) AS answered,
           round(avg(ring_seconds) FILTER (WHERE NOT on_mobile), 1) AS avg_ring_seconds,
           count(*) FILTER (WHERE within_ring_limit = false AND NOT on_mobile) AS ring_limit_breaches,
           count(*) FILTER (WHERE has_sheet) AS sheets
    FROM call_facts
    WHERE answered_at IS NOT NULL AND answered_by IS NOT NULL
    GROUP BY 1, 2, 3, 4
), people AS (  -- every leg of a customer call, named by the person on it (the mobile by its number)
    SELECT f.local_day AS day,
           CASE WHEN l.endpoint = c.trunk THEN c.forwarded_to ELSE l.endpoint END AS agent,
           l.endpoint = c.trunk AS duty_mobile,
           CASE WHEN l.endpoint = c.trunk THEN f.duty_holder END AS duty_holder,
           l.talk_seconds, l.stage, l.answered_at, l.transferred_by
    FROM call_legs l
    JOIN calls c ON c.linkedid = l.linkedid
    JOIN call_facts f ON f.linkedid = l.linkedid
), talk AS (
    SELECT day, agent, duty_mobile, duty_holder,
           sum(talk_seconds) AS talk,
           count(talk_seconds) AS talks,
           count(*) FILTER (WHERE stage = 'transfer') AS transfers_received
    FROM people
    WHERE answered_at IS NOT NULL AND agent IS NOT NULL
    GROUP BY 1, 2, 3, 4
), made AS (
    SELECT day, transferred_by AS agent, false AS duty_mobile, NULL::text AS duty_holder, count(*) AS transfers_made
    FROM people
    WHERE stage = 'transfer' AND transferred_by IS NOT NULL
    GROUP BY 1, 2
), persons AS (
    SELECT day, agent, duty_mobile, duty_holder FROM firsts
    UNION SELECT day, agent, duty_mobile, duty_holder FROM talk
    UNION SELECT day, agent, duty_mobile, duty_holder FROM made
)
SELECT p.day,
       p.agent,
       p.duty_mobile,
       p.duty_holder,
       coalesce(f.answered, 0) AS answered,
       f.avg_ring_seconds,
       coalesce(f.ring_limit_breaches, 0) AS ring_limit_breaches,
       round(coalesce(t.talk, 0), 1) AS talk_seconds,
       round(t.talk / nullif(t.talks, 0), 1) AS avg_talk_seconds,
       coalesce(f.sheets, 0) AS sheets,
       coalesce(m.transfers_made, 0) AS transfers_made,
       coalesce(t.transfers_received, 0) AS transfers_received
FROM persons p
LEFT JOIN firsts f ON (f.day, f.agent, f.duty_mobile) = (p.day, p.agent, p.duty_mobile)
                  AND f.duty_holder IS NOT DISTINCT FROM p.duty_holder
LEFT JOIN talk t ON (t.day, t.agent, t.duty_mobile) = (p.day, p.agent, p.duty_mobile)
                AND t.duty_holder IS NOT DISTINCT FROM p.duty_holder
LEFT JOIN made m ON (m.day, m.agent, m.duty_mobile) = (p.day, p.agent, p.duty_mobile)
                AND m.duty_holder IS NOT DISTINCT FROM p.duty_holder
ORDER BY p.day DESC, answered DESC, p.agent;

GRANT SELECT ON v_agent_daily TO pbx_supervisor, pbx_bridge;

COMMENT ON VIEW v_agent_daily IS '每人每日接听情况(客服手机按保管人另列;转接的通话时长按人分摊)/ per person per local day (the duty mobile per holder; a transferred call''s talk split between the people who had it)';
COMMENT ON COLUMN v_agent_daily.day IS '日期(本地)/ local date';
COMMENT ON COLUMN v_agent_daily.agent IS '坐席分机,或客服手机号 / agent phone endpoint, or the duty mobile number';
COMMENT ON COLUMN v_agent_daily.duty_mobile IS '是否客服手机 / this row is the duty mobile';
COMMENT ON COLUMN v_agent_daily.duty_holder IS '客服手机保管人 / who held the duty mobile';
COMMENT ON COLUMN v_agent_daily.answered IS '首问接听数(首问负责制)/ calls this person answered first (and owns)';
COMMENT ON COLUMN v_agent_daily.avg_ring_seconds IS '平均振铃时长(秒)/ average seconds the call rang before this agent answered first';
COMMENT ON COLUMN v_agent_daily.ring_limit_breaches IS '超过三响才接听的次数 / calls answered first after the ring limit';
COMMENT ON COLUMN v_agent_daily.talk_seconds IS '此人通话总时长(秒,含转入的通话)/ this person''s total talk with callers, transferred calls included';
COMMENT ON COLUMN v_agent_daily.avg_talk_seconds IS '平均每次通话时长(秒)/ average talk per call this person was on';
COMMENT ON COLUMN v_agent_daily.sheets IS '已填接听记录单数 / of the calls answered first, how many have a call sheet';
COMMENT ON COLUMN v_agent_daily.transfers_made IS '转出次数 / calls this person transferred to a colleague';
COMMENT ON COLUMN v_agent_daily.transfers_received IS '转入并接听次数 / transferred calls this person answered';
