-- pbx-bridge 0014: several PBXs (sites) write into one database.
--   What: every row that belongs to a PBX carries `pbx`, the PBX's name (calls, call_legs,
--     policy_violations, line_probes, agent_presence, open_hours, report_deliveries); the per-day
--     and per-agent keys become per PBX; the views gain a `pbx` column (appended last: existing
--     readers keep their columns) and their aggregates are per PBX; v_daily_kpi_all and
--     v_hourly_load_all give the figures of all PBXs together, computed from the calls.
--   Who writes for which PBX: every pbx-bridge connection sets `pbx_bridge.pbx = '<name>'`; the
--     column's default is session_pbx(), which refuses a session that did not say (no guessing).
--   Linkedids stay globally unique (calls keeps its key; call_notes and call_note_history need
--     no pbx): the operator gives each Asterisk its own `systemname`, which Asterisk puts before
--     every uniqueid and linkedid (`pbx-1795466707.80`); an Asterisk without one writes bare ids.
--   CEL has no pbx column (cel_pgsql writes it): a CEL row's PBX is told by its linkedid's prefix.
--   Rows stored before this version are one PBX's: they all get one name, chosen once: the
--     session's pbx_bridge.pbx (`pbx-bridge migrate` sets it from `[pbx] name`), else the most
--     common systemname prefix among calls.linkedid (the name defaults to the systemname), else
--     'default' (pbx-bridge's own name for a PBX with neither).
--   Still shared by all PBXs: bridge_settings (one time zone), schedule_overrides, duty_roster.

-- ---------------------------------------------------------------------------------------
-- The systemname an Asterisk put before a uniqueid or linkedid: 'pbx' of 'pbx-1795466707.80',
-- 'site-b' of 'site-b-1795466707.80'; NULL for a bare '1795466707.80' (no systemname).
CREATE FUNCTION pbx_system_name(linkedid text) RETURNS text
    LANGUAGE sql IMMUTABLE PARALLEL SAFE RETURNS NULL ON NULL INPUT
    RETURN substring(linkedid FROM '^(.+)-[0-9]+\.[0-9]+$');
COMMENT ON FUNCTION pbx_system_name(text) IS 'Asterisk 通话编号前缀的系统名(无则为空)/ the Asterisk systemname a uniqueid or linkedid begins with (NULL: none)';

-- The PBX this session writes for; a session that has not said is refused, never guessed.
CREATE FUNCTION session_pbx() RETURNS text
    LANGUAGE plpgsql STABLE PARALLEL SAFE
AS $$
DECLARE
    name text := current_setting('pbx_bridge.pbx', true);  -- NULL if never set, '' once RESET
BEGIN
    IF coalesce(name, '') = '' THEN
        RAISE EXCEPTION 'this session has not said which PBX it writes for: set pbx_bridge.pbx (pbx-bridge does it on every connection)'
            USING ERRCODE = 'object_not_in_prerequisite_state',
                  HINT = 'SET pbx_bridge.pbx = ''<name>'', or connect with the server setting pbx_bridge.pbx';
    END IF;
    RETURN name;
END
$$;
COMMENT ON FUNCTION session_pbx() IS '本会话所写入的 PBX 名称(pbx_bridge.pbx),未设置则报错 / the PBX this session writes for (pbx_bridge.pbx); an error when the session has not set it';

GRANT EXECUTE ON FUNCTION session_pbx(), pbx_system_name(text) TO pbx_supervisor, pbx_bridge;

-- ---------------------------------------------------------------------------------------
-- The `pbx` column. It is added with the backfill name as a constant default, so the rows
-- already stored take it without rewriting the tables; new rows then get session_pbx().
DO $$
DECLARE
    backfill text := coalesce(
        nullif(current_setting('pbx_bridge.pbx', true), ''),      -- pbx-bridge migrate: [pbx] name
        (SELECT pbx_system_name(linkedid) FROM calls               -- the most common systemname
          WHERE pbx_system_name(linkedid) IS NOT NULL
          GROUP BY 1 ORDER BY count(*) DESC, 1 LIMIT 1),
        'default');                                                -- neither: pbx-bridge's fallback
    pattern constant text := '^[A-Za-z0-9_.:@/-]{1,64}$';       -- as pbx_bridge/pbx.py NAME_PATTERN
    tab text;
BEGIN
    IF backfill !~ pattern THEN
        RAISE EXCEPTION 'the rows already stored cannot be named %: a PBX name is 1 to 64 of A-Z a-z 0-9 _ . : @ / -',
            quote_literal(backfill)
            USING HINT = 'set [pbx] name and run pbx-bridge migrate (it sets pbx_bridge.pbx)';
    END IF;
    RAISE NOTICE 'rows stored before 0014 belong to PBX %', quote_literal(backfill);
    FOREACH tab IN ARRAY ARRAY['calls', 'call_legs', 'policy_violations', 'line_probes', 'agent_presence',
                               'open_hours', 'report_deliveries'] LOOP
        EXECUTE format('ALTER TABLE %I ADD COLUMN pbx text NOT NULL DEFAULT %L', tab, backfill);
        EXECUTE format('ALTER TABLE %I ALTER COLUMN pbx SET DEFAULT session_pbx()', tab);
        EXECUTE format('ALTER TABLE %I ADD CONSTRAINT %I CHECK (pbx ~ %L)', tab, tab || '_pbx_check', pattern);
        EXECUTE format('COMMENT ON COLUMN %I.pbx IS %L', tab,
                       'PBX 名称(站点;默认为本会话的 pbx_bridge.pbx)/ the PBX (site) this row belongs to; defaults to the session''s pbx_bridge.pbx');
    END LOOP;
END
$$;

-- ---------------------------------------------------------------------------------------
-- Keys per PBX. linkedid-keyed rows stay unique as they were (linkedids are global).
ALTER TABLE open_hours DROP CONSTRAINT open_hours_pkey, ADD PRIMARY KEY (pbx, day);
ALTER TABLE report_deliveries DROP CONSTRAINT report_deliveries_pkey, ADD PRIMARY KEY (pbx, day);
COMMENT ON TABLE open_hours IS '每个站点每日实际营业时间(节假日、调休、临时调整后),由该站点的 pbx-bridge 写入 / each PBX''s effective opening hours per local day, as its pbx-bridge applied them';
COMMENT ON TABLE report_deliveries IS '已发送的日报(每个站点每天一份)/ daily reports mailed, one per PBX and day covered';

DROP INDEX agent_presence_one_open;
CREATE UNIQUE INDEX agent_presence_one_open ON agent_presence (pbx, agent) WHERE signed_in_at IS NULL;

-- one violation of a kind per call; outbound attempts per channel (channel names repeat across PBXs)
DROP INDEX policy_violations_once;
CREATE UNIQUE INDEX policy_violations_once
    ON policy_violations (pbx, kind, (coalesce(linkedid, '')), (coalesce(details ->> 'channel', '')));
-- a break breach once per agent and local day (agents' names repeat across PBXs)
DROP INDEX policy_violations_break_once;
CREATE UNIQUE INDEX policy_violations_break_once
    ON policy_violations (pbx, (details ->> 'agent'), (details ->> 'day')) WHERE kind = 'break_over_limit';

CREATE INDEX calls_pbx_started_at ON calls (pbx, started_at);

-- =======================================================================================
-- Views. Each keeps its columns and gains `pbx` last; every join of per-PBX rows matches on
-- pbx (rows joined by linkedid are one PBX's already).

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
       c.wait_seconds, c.mobile_ring_seconds, c.mobile_within_ring_limit, c.transferred_to,
       c.pbx
FROM calls c
CROSS JOIN bridge_zone z
LEFT JOIN call_notes n ON n.linkedid = c.linkedid
WHERE NOT c.is_probe;

-- CEL rows carry no PBX: the systemname of the linkedid says which Asterisk placed the call.
CREATE OR REPLACE VIEW outbound_answered AS
SELECT o.linkedid,
       pbx_number_key(o.exten) AS dialled_key,
       min(a.eventtime) AT TIME ZONE 'UTC' AS answered_at,
       pbx_system_name(o.linkedid) AS system_name
FROM cel o
JOIN cel a ON a.linkedid = o.linkedid AND a.eventtype = 'ANSWER' AND a.uniqueid <> o.uniqueid
WHERE o.eventtype = 'CHAN_START' AND o.uniqueid = o.linkedid AND pbx_number_key(o.exten) IS NOT NULL
GROUP BY o.linkedid, o.exten;
COMMENT ON VIEW outbound_answered IS '内部:从本机非400线路外拨并接通的电话(取自 CEL,system_name 为拨出的 Asterisk)/ internal: answered calls placed from a PBX''s other lines (from CEL; system_name: the Asterisk that placed them)';

-- ---------------------------------------------------------------------------------------
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
         WHERE l.linkedid = f.linkedid AND l.stage IN ('transfer', 'transfer_return')) AS transfers,
       f.pbx
FROM call_facts f
ORDER BY f.started_at DESC;

COMMENT ON COLUMN v_call_log.pbx IS '接听站点(PBX 名称)/ the PBX (site) the call came in at';

-- ---------------------------------------------------------------------------------------
-- One row per PBX and local day (0009's figures, per PBX). Violations count at their own PBX.
CREATE OR REPLACE VIEW v_daily_kpi AS
WITH per_day AS (
    SELECT pbx,
           local_day AS day,
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
    GROUP BY pbx, local_day
), violations AS (
    SELECT v.pbx,
           coalesce(f.local_day, (v.occurred_at AT TIME ZONE z.timezone)::date) AS day,
           count(*) FILTER (WHERE v.kind = 'ring_limit') AS ring_limit,
           count(*) FILTER (WHERE v.kind = 'unanswered') AS unanswered,
           count(*) FILTER (WHERE v.kind = 'outbound_attempt') AS outbound_attempt,
           count(*) FILTER (WHERE v.kind = 'complaint_overdue') AS complaint_overdue
    FROM policy_violations v
    CROSS JOIN bridge_zone z
    LEFT JOIN calls c ON c.linkedid = v.linkedid
    LEFT JOIN call_facts f ON f.linkedid = v.linkedid
    WHERE NOT coalesce(c.is_probe, false)
    GROUP BY 1, 2
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
       round(100.0 * d.mobile_within_limit / nullif(d.mobile_limit_applies, 0), 1) AS mobile_within_ring_limit_pct,
       coalesce(d.pbx, v.pbx) AS pbx
FROM per_day d
FULL JOIN violations v ON v.pbx = d.pbx AND v.day = d.day
ORDER BY day DESC, pbx;

COMMENT ON VIEW v_daily_kpi IS '每个站点每日指标(本地日期,不含测拨),最新在前;全部站点合计见 v_daily_kpi_all / daily KPIs per PBX and local day (probes excluded), newest first; all PBXs together: v_daily_kpi_all';
COMMENT ON COLUMN v_daily_kpi.pbx IS '站点(PBX 名称)/ the PBX (site) these figures are of';

-- All PBXs together: v_daily_kpi as 0009 defined it (every call and violation, whatever its
-- PBX), so rates and averages come from the calls themselves, never from per-PBX rows.
CREATE VIEW v_daily_kpi_all AS
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

COMMENT ON VIEW v_daily_kpi_all IS '全部站点合计的每日指标(本地日期,不含测拨;比率与平均值按全部来电计算,而非各站点平均),最新在前 / daily KPIs of all PBXs together per local day (probes excluded; rates and averages computed from all the calls, not averaged over PBXs), newest first';
COMMENT ON COLUMN v_daily_kpi_all.day IS '日期(本地)/ local date';
COMMENT ON COLUMN v_daily_kpi_all.calls IS '来电总数 / calls';
COMMENT ON COLUMN v_daily_kpi_all.answered IS '接通数(坐席或客服手机)/ calls answered (agents or duty mobile)';
COMMENT ON COLUMN v_daily_kpi_all.answer_rate_pct IS '接通率 % = 接通数 / 来电总数 / answer rate in percent';
COMMENT ON COLUMN v_daily_kpi_all.within_ring_limit_pct IS '三响内接听率 % = 三响内接听 / (三响内接听 + 超过三响);来电方在三响内挂断的不计 / share of calls answered within the ring limit among calls answered or rung past it, in percent';
COMMENT ON COLUMN v_daily_kpi_all.avg_ring_seconds IS '平均振铃时长(秒,坐席接听的来电)/ average seconds to answer at the agents'' phones';
COMMENT ON COLUMN v_daily_kpi_all.p90_ring_seconds IS '90% 坐席接听的来电在此秒数内接听(实际观测值)/ 90 % of the agents'' answers came within this many seconds (an observed value, not interpolated)';
COMMENT ON COLUMN v_daily_kpi_all.abandoned IS '来电方接听前挂断数 / calls the caller hung up before anyone answered';
COMMENT ON COLUMN v_daily_kpi_all.missed IS '未接数(未接、转手机未接、语音留言)/ calls nobody answered that the caller did not abandon (missed, forward_missed, voicemail)';
COMMENT ON COLUMN v_daily_kpi_all.voicemail IS '语音留言数(未接数的一部分)/ calls that ended in voicemail (part of missed)';
COMMENT ON COLUMN v_daily_kpi_all.unfinished IS '未结束或结束未被记录的来电(进行中,或AMI中断时丢失结束)/ calls with no recorded end: in progress, or their end was lost in an AMI gap; calls = answered + abandoned + missed + unfinished';
COMMENT ON COLUMN v_daily_kpi_all.after_hours_calls IS '非工作时间来电数 / calls outside business hours';
COMMENT ON COLUMN v_daily_kpi_all.after_hours_mobile_answered IS '非工作时间客服手机接听数 / after-hours calls the duty mobile answered';
COMMENT ON COLUMN v_daily_kpi_all.avg_talk_seconds IS '平均处理时间(平均通话秒数)/ average handle (talk) time of answered calls, seconds';
COMMENT ON COLUMN v_daily_kpi_all.sheets IS '已填接听记录单数 / calls with a filled call sheet';
COMMENT ON COLUMN v_daily_kpi_all.sheet_rate_pct IS '录入率 % = 已填记录单 / 来电总数 / recording rate in percent (sheets / calls)';
COMMENT ON COLUMN v_daily_kpi_all.ring_limit_violations IS '超过三响违规数 / ring-limit breaches';
COMMENT ON COLUMN v_daily_kpi_all.unanswered_violations IS '无人接听违规数 / unanswered-call breaches';
COMMENT ON COLUMN v_daily_kpi_all.outbound_attempt_violations IS '400线路外拨违规数 / attempts to dial out on the hotline';
COMMENT ON COLUMN v_daily_kpi_all.complaint_overdue_violations IS '投诉超时未处理数 / complaints not resolved in time';
COMMENT ON COLUMN v_daily_kpi_all.avg_wait_seconds IS '平均等待时长(秒,有人接听的来电)/ average caller wait until a person answered, seconds';
COMMENT ON COLUMN v_daily_kpi_all.p90_wait_seconds IS '90% 有人接听的来电在此秒数内接听(实际观测值)/ 90 % of answered callers waited at most this long (an observed value)';
COMMENT ON COLUMN v_daily_kpi_all.mobile_within_ring_limit_pct IS '客服手机三响内接听率 % / share of forwards the duty mobile answered within the ring limit, among those answered or rung past it, in percent';

-- ---------------------------------------------------------------------------------------
-- Per PBX, person and local day (0013's figures, per PBX): an agent's name at one PBX is
-- another person than the same name at another; breaks and opening hours are the PBX's own.
CREATE OR REPLACE VIEW v_agent_daily AS
WITH firsts AS (
    SELECT pbx, local_day AS day, answered_by AS agent, on_mobile AS duty_mobile, duty_holder,
           count(*) AS answered,
           round(avg(ring_seconds) FILTER (WHERE NOT on_mobile), 1) AS avg_ring_seconds,
           count(*) FILTER (WHERE within_ring_limit = false AND NOT on_mobile) AS ring_limit_breaches,
           count(*) FILTER (WHERE has_sheet) AS sheets
    FROM call_facts
    WHERE answered_at IS NOT NULL AND answered_by IS NOT NULL
    GROUP BY 1, 2, 3, 4, 5
), people AS (  -- every leg of a customer call, named by the person on it (the mobile by its number)
    SELECT f.pbx,
           f.local_day AS day,
           CASE WHEN l.endpoint = c.trunk THEN c.forwarded_to ELSE l.endpoint END AS agent,
           l.endpoint = c.trunk AS duty_mobile,
           CASE WHEN l.endpoint = c.trunk THEN f.duty_holder END AS duty_holder,
           l.talk_seconds, l.stage, l.answered_at, l.transferred_by, l.linkedid
    FROM call_legs l
    JOIN calls c ON c.linkedid = l.linkedid
    JOIN call_facts f ON f.linkedid = l.linkedid
), offered AS (  -- the customer calls an agent's phone rang for (transfers included), and those it answered
    SELECT pbx, day, agent, duty_mobile, duty_holder, count(DISTINCT linkedid) AS offered,
           count(DISTINCT linkedid) FILTER (WHERE answered_at IS NOT NULL) AS taken
    FROM people
    WHERE agent IS NOT NULL AND NOT duty_mobile
    GROUP BY 1, 2, 3, 4, 5
), breaks AS (  -- minutes signed out per local day (an open break counted until now)
    SELECT p.pbx, (g.day_start AT TIME ZONE z.timezone)::date AS day, p.agent, false AS duty_mobile,
           NULL::text AS duty_holder,
           sum(extract(epoch FROM least(coalesce(p.signed_in_at, now()), g.day_start + interval '1 day')
                                  - greatest(p.signed_out_at, g.day_start))) / 60 AS minutes
    FROM agent_presence p
    CROSS JOIN bridge_zone z
    CROSS JOIN LATERAL generate_series(
        date_trunc('day', p.signed_out_at AT TIME ZONE z.timezone),
        date_trunc('day', coalesce(p.signed_in_at, now()) AT TIME ZONE z.timezone),
        interval '1 day') AS d(local_day)
    CROSS JOIN LATERAL (SELECT d.local_day AT TIME ZONE z.timezone AS day_start) AS g
    WHERE least(coalesce(p.signed_in_at, now()), g.day_start + interval '1 day') > greatest(p.signed_out_at, g.day_start)
    GROUP BY 1, 2, 3
), talk AS (
    SELECT pbx, day, agent, duty_mobile, duty_holder,
           sum(talk_seconds) AS talk,
           count(talk_seconds) AS talks,
           count(*) FILTER (WHERE stage = 'transfer') AS transfers_received
    FROM people
    WHERE answered_at IS NOT NULL AND agent IS NOT NULL
    GROUP BY 1, 2, 3, 4, 5
), made AS (
    SELECT pbx, day, transferred_by AS agent, false AS duty_mobile, NULL::text AS duty_holder,
           count(*) AS transfers_made
    FROM people
    WHERE stage = 'transfer' AND transferred_by IS NOT NULL
    GROUP BY 1, 2, 3
), persons AS (
    SELECT pbx, day, agent, duty_mobile, duty_holder FROM firsts
    UNION SELECT pbx, day, agent, duty_mobile, duty_holder FROM talk
    UNION SELECT pbx, day, agent, duty_mobile, duty_holder FROM made
    UNION SELECT pbx, day, agent, duty_mobile, duty_holder FROM offered
    UNION SELECT pbx, day, agent, duty_mobile, duty_holder FROM breaks
), signed_in AS (  -- an agent's open hours (so far, today) minus the time signed out inside them
    SELECT p.pbx, p.day, p.agent,
           (multirange_seconds(h.open * so_far.until_now)
            - multirange_seconds(h.open * so_far.until_now * coalesce(o.out, '{}'::tstzmultirange))) / 60 AS minutes
    FROM persons p
    JOIN open_hours h ON (h.pbx, h.day) = (p.pbx, p.day)
    CROSS JOIN LATERAL (SELECT tstzmultirange(tstzrange(NULL, now())) AS until_now) AS so_far
    LEFT JOIN LATERAL (
        SELECT range_agg(tstzrange(a.signed_out_at, coalesce(a.signed_in_at, now()))) AS out
        FROM agent_presence a
        WHERE a.pbx = p.pbx AND a.agent = p.agent AND a.signed_out_at < upper(h.open)
          AND coalesce(a.signed_in_at, now()) > lower(h.open)
    ) AS o ON true
    WHERE NOT p.duty_mobile
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
       coalesce(t.transfers_received, 0) AS transfers_received,
       coalesce(o.offered, 0) AS calls_offered,
       round(100.0 * o.taken / nullif(o.offered, 0), 1) AS answer_share_pct,
       round(coalesce(b.minutes, 0), 1) AS break_minutes,
       round(s.minutes::numeric, 1) AS signed_in_minutes,
       p.pbx
FROM persons p
LEFT JOIN firsts f ON (f.pbx, f.day, f.agent, f.duty_mobile) = (p.pbx, p.day, p.agent, p.duty_mobile)
                  AND f.duty_holder IS NOT DISTINCT FROM p.duty_holder
LEFT JOIN talk t ON (t.pbx, t.day, t.agent, t.duty_mobile) = (p.pbx, p.day, p.agent, p.duty_mobile)
                AND t.duty_holder IS NOT DISTINCT FROM p.duty_holder
LEFT JOIN made m ON (m.pbx, m.day, m.agent, m.duty_mobile) = (p.pbx, p.day, p.agent, p.duty_mobile)
                AND m.duty_holder IS NOT DISTINCT FROM p.duty_holder
LEFT JOIN offered o ON (o.pbx, o.day, o.agent, o.duty_mobile) = (p.pbx, p.day, p.agent, p.duty_mobile)
                   AND o.duty_holder IS NOT DISTINCT FROM p.duty_holder
LEFT JOIN breaks b ON (b.pbx, b.day, b.agent, b.duty_mobile) = (p.pbx, p.day, p.agent, p.duty_mobile)
                  AND b.duty_holder IS NOT DISTINCT FROM p.duty_holder
LEFT JOIN signed_in s ON (s.pbx, s.day, s.agent) = (p.pbx, p.day, p.agent) AND NOT p.duty_mobile
ORDER BY p.day DESC, answered DESC, p.agent, p.pbx;

COMMENT ON VIEW v_agent_daily IS '每个站点每人每日接听情况(客服手机按保管人另列;转接的通话时长按人分摊)/ per PBX, person and local day (the duty mobile per holder; a transferred call''s talk split between the people who had it)';
COMMENT ON COLUMN v_agent_daily.pbx IS '站点(PBX 名称);不同站点的同名分机是不同的人 / the PBX (site); the same endpoint name at two PBXs is two people';

-- ---------------------------------------------------------------------------------------
-- A call is cleared by a later answered call from the number at the same PBX, or by an answered
-- callback placed at the same PBX. CEL has no pbx column: a callback's PBX is known by the
-- systemname its linkedid begins with: the missed call's own Asterisk, or another Asterisk
-- whose hotline calls are recorded under the same PBX name (a PBX whose systemname changed).
-- A callback from an Asterisk that never recorded a hotline call here belongs to no known PBX
-- and clears nothing.
CREATE OR REPLACE VIEW v_callbacks_due AS
SELECT f.local_started::timestamp(0) AS called_at,
       f.caller_number,
       f.caller_name,
       f.disposition,
       pbx_disposition_label(f.disposition) AS result,
       f.after_hours,
       date_trunc('second', now() - coalesce(f.ended_at, f.started_at)) AS waiting,
       floor(extract(epoch FROM now() - coalesce(f.ended_at, f.started_at)) / 60)::integer AS waiting_minutes,
       count(*) OVER (PARTITION BY f.pbx, f.caller_key) AS due_calls_from_number,
       f.linkedid,
       f.pbx
FROM call_facts f
WHERE f.disposition IN ('missed', 'abandoned', 'voicemail', 'forward_missed')
  AND f.caller_key IS NOT NULL
  AND NOT EXISTS (SELECT 1 FROM call_facts later
                  WHERE later.pbx = f.pbx AND later.caller_key = f.caller_key AND later.answered_at IS NOT NULL
                    AND later.started_at > f.started_at)
  AND NOT EXISTS (SELECT 1 FROM outbound_answered o
                  WHERE right(o.dialled_key, 5) = right(f.caller_key, 5)
                    AND o.dialled_key LIKE '%' || f.caller_key
                    AND o.answered_at > f.started_at
                    AND (o.system_name IS NOT DISTINCT FROM pbx_system_name(f.linkedid)
                         OR EXISTS (SELECT 1 FROM calls same
                                    WHERE same.pbx = f.pbx
                                      AND pbx_system_name(same.linkedid) IS NOT DISTINCT FROM o.system_name)))
ORDER BY f.started_at;

COMMENT ON VIEW v_callbacks_due IS '待回拨:未接、放弃、语音留言、转手机未接且尚未回拨的来电,最早在前。之后从同一站点非400线路外拨该号码并接通,或该号码再次致电同一站点并接通,即视为已回拨 / calls still to be called back, oldest first; a later answered call from any non-hotline line of the same PBX to the number, or a later answered call from it to the same PBX, clears one';
COMMENT ON COLUMN v_callbacks_due.due_calls_from_number IS '该号码在本站点待回拨的来电数 / calls from this number still due a callback at this PBX';
COMMENT ON COLUMN v_callbacks_due.pbx IS '站点(PBX 名称),由该站点回拨 / the PBX (site) the call came in at, which calls back';

-- ---------------------------------------------------------------------------------------
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
       v.id,
       v.pbx
FROM policy_violations v
CROSS JOIN bridge_zone z
LEFT JOIN calls c ON c.linkedid = v.linkedid
WHERE NOT coalesce(c.is_probe, false)
ORDER BY v.occurred_at DESC, v.id DESC;

COMMENT ON COLUMN v_violations.pbx IS '站点(PBX 名称)/ the PBX (site) where it happened';

-- ---------------------------------------------------------------------------------------
-- One row per PBX: each PBX's line, from its own probes and calls. The PBXs are those with
-- calls, probes or published opening hours, and the session's own (pbx_bridge.pbx, if set), so
-- a pbx-bridge that has recorded nothing yet still reads its row ('unknown').
CREATE OR REPLACE VIEW v_line_health AS
WITH RECURSIVE call_pbxs AS (  -- the distinct pbx of calls, one index probe per name (calls_pbx_started_at)
    (SELECT pbx FROM calls ORDER BY pbx LIMIT 1)
    UNION ALL
    SELECT (SELECT c.pbx FROM calls c WHERE c.pbx > p.pbx ORDER BY c.pbx LIMIT 1)
    FROM call_pbxs p WHERE p.pbx IS NOT NULL
), pbxs AS (
    SELECT pbx FROM call_pbxs WHERE pbx IS NOT NULL
    UNION SELECT pbx FROM line_probes
    UNION SELECT pbx FROM open_hours
    UNION SELECT s.pbx FROM (SELECT nullif(current_setting('pbx_bridge.pbx', true), '') AS pbx) AS s
          WHERE s.pbx IS NOT NULL
)
SELECT s.code AS state,
       CASE s.code WHEN 'ok' THEN '正常' WHEN 'failing' THEN '故障' ELSE '未知' END AS state_label,
       s.evidence,
       (p.started_at AT TIME ZONE z.timezone)::timestamp(0) AS last_probe_at,
       p.trigger AS last_probe_trigger,
       p.outcome AS last_probe_outcome,
       p.delay_ms AS last_probe_delay_ms,
       p.reason AS last_probe_reason,
       (SELECT (max(started_at) AT TIME ZONE z.timezone)::timestamp(0) FROM line_probes
         WHERE pbx = x.pbx AND outcome = 'ok') AS last_ok_probe_at,
       (lc.at AT TIME ZONE z.timezone)::timestamp(0) AS last_call_at,
       floor(extract(epoch FROM now() - lc.at) / 60)::integer AS minutes_since_last_call,
       t.ok AS probes_ok_today,
       t.failed AS probes_failed_today,
       x.pbx
FROM pbxs x
CROSS JOIN bridge_zone z
LEFT JOIN LATERAL (SELECT * FROM line_probes lp WHERE lp.pbx = x.pbx
                   ORDER BY lp.finished_at DESC, lp.id DESC LIMIT 1) AS p ON true
CROSS JOIN LATERAL (SELECT max(started_at) AS at FROM calls WHERE pbx = x.pbx AND NOT is_probe) AS lc
CROSS JOIN LATERAL (
    SELECT count(*) FILTER (WHERE tp.outcome = 'ok') AS ok,
           count(*) FILTER (WHERE tp.outcome <> 'ok') AS failed
    FROM line_probes tp
    WHERE tp.pbx = x.pbx
      AND (tp.started_at AT TIME ZONE z.timezone)::date = (now() AT TIME ZONE z.timezone)::date
) AS t
CROSS JOIN LATERAL (
    SELECT CASE
               WHEN p.finished_at IS NULL AND lc.at IS NULL THEN 'unknown'
               WHEN p.finished_at IS NULL OR lc.at > p.finished_at THEN 'ok'
               WHEN p.outcome = 'ok' THEN 'ok'
               ELSE 'failing' END AS code,
           CASE WHEN lc.at IS NOT NULL AND (p.finished_at IS NULL OR lc.at > p.finished_at) THEN 'call'
                WHEN p.finished_at IS NOT NULL THEN 'probe' END AS evidence
) AS s
ORDER BY x.pbx;

COMMENT ON VIEW v_line_health IS '线路状况(每个站点一行):最近测拨、最近真实来电、当前判断 / line health, one row per PBX: last probe, last real call, current state';
COMMENT ON COLUMN v_line_health.pbx IS '站点(PBX 名称):有来电、测拨或营业时间记录的站点,及本会话的站点 / the PBX (site): those with calls, probes or published opening hours, and the session''s own';

-- ---------------------------------------------------------------------------------------
CREATE OR REPLACE VIEW v_unrecorded_calls AS
SELECT f.local_started::timestamp(0) AS started,
       f.caller_number,
       f.caller_name,
       f.answered_by,
       f.on_mobile AS answered_on_mobile,
       f.duty_holder,
       f.talk_seconds,
       floor(extract(epoch FROM now() - coalesce(f.ended_at, f.started_at)) / 60)::integer AS minutes_since_call,
       f.linkedid,
       f.pbx
FROM call_facts f
WHERE f.answered_at IS NOT NULL AND NOT f.has_sheet
ORDER BY f.started_at;

COMMENT ON COLUMN v_unrecorded_calls.pbx IS '站点(PBX 名称)/ the PBX (site) the call came in at';

-- ---------------------------------------------------------------------------------------
CREATE OR REPLACE VIEW v_hourly_load AS
SELECT local_day AS day,
       extract(isodow FROM local_started)::integer AS weekday,
       extract(hour FROM local_started)::integer AS hour,
       count(*) AS calls,
       count(*) FILTER (WHERE answered_at IS NOT NULL) AS answered,
       count(*) FILTER (WHERE answered_at IS NULL AND disposition IS NOT NULL) AS unanswered,
       count(*) FILTER (WHERE within_ring_limit = false) AS ring_limit_breaches,
       round(avg(ring_seconds) FILTER (WHERE answered_at IS NOT NULL AND NOT on_mobile), 1) AS avg_ring_seconds,
       round(coalesce(sum(talk_seconds), 0) / 60.0, 1) AS talk_minutes,
       pbx
FROM call_facts
GROUP BY pbx, local_day, weekday, hour
ORDER BY day DESC, hour, pbx;

COMMENT ON VIEW v_hourly_load IS '每个站点每小时话务量(本地时间,用于排班);全部站点合计见 v_hourly_load_all / calls per PBX and local hour, for staffing; all PBXs together: v_hourly_load_all';
COMMENT ON COLUMN v_hourly_load.pbx IS '站点(PBX 名称)/ the PBX (site) these figures are of';

-- All PBXs together: v_hourly_load as 0006 defined it.
CREATE VIEW v_hourly_load_all AS
SELECT local_day AS day,
       extract(isodow FROM local_started)::integer AS weekday,
       extract(hour FROM local_started)::integer AS hour,
       count(*) AS calls,
       count(*) FILTER (WHERE answered_at IS NOT NULL) AS answered,
       count(*) FILTER (WHERE answered_at IS NULL AND disposition IS NOT NULL) AS unanswered,
       count(*) FILTER (WHERE within_ring_limit = false) AS ring_limit_breaches,
       round(avg(ring_seconds) FILTER (WHERE answered_at IS NOT NULL AND NOT on_mobile), 1) AS avg_ring_seconds,
       round(coalesce(sum(talk_seconds), 0) / 60.0, 1) AS talk_minutes
FROM call_facts
GROUP BY local_day, weekday, hour
ORDER BY day DESC, hour;

COMMENT ON VIEW v_hourly_load_all IS '全部站点合计的每小时话务量(本地时间;平均值按全部来电计算)/ calls of all PBXs together per local hour (averages computed from all the calls)';
COMMENT ON COLUMN v_hourly_load_all.day IS '日期(本地)/ local date';
COMMENT ON COLUMN v_hourly_load_all.weekday IS '星期(1=周一 … 7=周日)/ ISO weekday, 1 = Monday';
COMMENT ON COLUMN v_hourly_load_all.hour IS '小时(0–23,本地)/ local hour the calls arrived in';
COMMENT ON COLUMN v_hourly_load_all.calls IS '来电数 / calls';
COMMENT ON COLUMN v_hourly_load_all.answered IS '接通数 / answered';
COMMENT ON COLUMN v_hourly_load_all.unanswered IS '未接通数(已结束)/ ended without an answer';
COMMENT ON COLUMN v_hourly_load_all.ring_limit_breaches IS '超过三响数 / calls that rang past the limit';
COMMENT ON COLUMN v_hourly_load_all.avg_ring_seconds IS '平均振铃时长(秒,坐席接听)/ average seconds to answer at the agents'' phones';
COMMENT ON COLUMN v_hourly_load_all.talk_minutes IS '通话总分钟数 / total talk minutes';

-- ---------------------------------------------------------------------------------------
-- The form's columns are Chinese labels: the PBX is "站点" (site).
CREATE OR REPLACE VIEW v_call_sheet AS
SELECT f.local_started::timestamp(0) AS "来电时间",
       coalesce(nullif(n.caller_name, ''), f.caller_name) AS "客户姓名",
       coalesce(nullif(n.contact, ''), f.caller_number) AS "联系方式",
       n.category AS "问题类型",
       n.summary AS "问题描述摘要",
       n.resolution AS "处理结果",
       n.owner AS "跟进人",
       n.status AS "跟进状态",
       f.answered_by AS "接听人",
       (n.updated_at AT TIME ZONE (SELECT timezone FROM bridge_zone))::timestamp(0) AS "最后修改时间",
       n.updated_by AS "最后修改人",
       f.linkedid AS "通话编号",
       f.pbx AS "站点"
FROM call_facts f
JOIN call_notes n ON n.linkedid = f.linkedid
ORDER BY f.started_at DESC;

COMMENT ON COLUMN v_call_sheet."站点" IS '站点(PBX 名称,即 pbx 列)/ the PBX (site) the call came in at: the column other views call pbx';

-- ---------------------------------------------------------------------------------------
-- One row per PBX and agent ever signed out there (0010's figures, per PBX).
CREATE OR REPLACE VIEW v_agent_presence AS
WITH today AS (
    SELECT z.timezone,
           (date_trunc('day', now() AT TIME ZONE z.timezone) AT TIME ZONE z.timezone) AS starts,
           now() AS now
    FROM bridge_zone z
), latest AS (
    SELECT DISTINCT ON (p.pbx, p.agent) p.pbx, p.agent, p.signed_out_at, p.signed_in_at, p.reason, p.set_by,
           p.signed_out_by, p.signed_in_by, p.signed_in_set_by
    FROM agent_presence p
    ORDER BY p.pbx, p.agent, (p.signed_in_at IS NULL) DESC, p.signed_out_at DESC, p.id DESC
), spent AS (
    SELECT p.pbx, p.agent,
           sum(extract(epoch FROM least(coalesce(p.signed_in_at, t.now), t.now)
                                  - greatest(p.signed_out_at, t.starts))) AS seconds,
           count(*) FILTER (WHERE p.signed_out_at >= t.starts) AS sign_outs
    FROM agent_presence p
    CROSS JOIN today t
    WHERE p.signed_out_at < t.now AND coalesce(p.signed_in_at, 'infinity') > t.starts
    GROUP BY p.pbx, p.agent
)
SELECT l.agent,
       CASE WHEN l.signed_in_at IS NULL THEN 'out' ELSE 'in' END AS state,
       CASE WHEN l.signed_in_at IS NULL THEN '签出休息' ELSE '已签入' END AS state_label,
       (coalesce(l.signed_in_at, l.signed_out_at) AT TIME ZONE t.timezone)::timestamp(0) AS since,
       CASE WHEN l.signed_in_at IS NULL THEN l.reason ELSE '' END AS reason,
       coalesce(l.signed_in_set_by, l.set_by) AS set_by,
       coalesce(l.signed_in_by, l.signed_out_by) AS changed_by,
       round(coalesce(s.seconds, 0) / 60, 1) AS signed_out_minutes_today,
       coalesce(s.sign_outs, 0) AS sign_outs_today,
       l.pbx
FROM latest l
CROSS JOIN today t
LEFT JOIN spent s ON (s.pbx, s.agent) = (l.pbx, l.agent)
ORDER BY (l.signed_in_at IS NULL) DESC, l.agent, l.pbx;

COMMENT ON VIEW v_agent_presence IS '坐席签入签出状态(每个站点每个签出过的坐席一行,签出中的在前)/ agent presence: one row per PBX and agent ever signed out there, those out now first';
COMMENT ON COLUMN v_agent_presence.pbx IS '站点(PBX 名称)/ the PBX (site) the agent works at';

-- ---------------------------------------------------------------------------------------
GRANT SELECT ON v_daily_kpi_all, v_hourly_load_all TO pbx_supervisor, pbx_bridge;
