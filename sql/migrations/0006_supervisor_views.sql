-- pbx-bridge 0006: the supervisors' views (names are contracts, DESIGN.md §4).
-- Times are local to bridge_settings.timezone (the configured [timezone]); probe calls are
-- excluded everywhere. Internal helper views (no v_ prefix) are not granted to supervisors.

-- A phone number reduced to what identifies it, so "+86 139-0013-9000", "008613900139000"
-- and a dialled "913900139000" can be matched: digits only, without the 86 country code
-- and leading zeros. Null when fewer than 5 digits remain (withheld or not a number).
CREATE FUNCTION pbx_number_key(number text) RETURNS text
    LANGUAGE sql IMMUTABLE PARALLEL SAFE RETURNS NULL ON NULL INPUT
    RETURN (SELECT CASE WHEN length(k) >= 5 THEN k END
            FROM (SELECT ltrim(regexp_replace(regexp_replace(number, '[^0-9]', '', 'g'), '^(00)?86(?=[0-9]{10})', ''),
                               '0') AS k) AS digits);
COMMENT ON FUNCTION pbx_number_key(text) IS '电话号码比对键:仅数字,去掉国家码86与前导0 / a number''s matching key: digits, without country code 86 and leading zeros';

CREATE FUNCTION pbx_disposition_label(disposition text) RETURNS text
    LANGUAGE sql IMMUTABLE PARALLEL SAFE
    RETURN CASE disposition
        WHEN 'answered' THEN '已接听'
        WHEN 'abandoned' THEN '来电方挂断'
        WHEN 'missed' THEN '未接'
        WHEN 'forwarded' THEN '转客服手机已接'
        WHEN 'forward_missed' THEN '转客服手机未接'
        WHEN 'voicemail' THEN '语音留言'
        ELSE '进行中或未结束' END;
COMMENT ON FUNCTION pbx_disposition_label(text) IS '通话结果的中文名称 / Chinese label of a call disposition';

CREATE FUNCTION pbx_violation_label(kind text) RETURNS text
    LANGUAGE sql IMMUTABLE PARALLEL SAFE
    RETURN CASE kind
        WHEN 'ring_limit' THEN '超过三响未接'
        WHEN 'outbound_attempt' THEN '400线路外拨'
        WHEN 'unanswered' THEN '来电无人接听'
        WHEN 'complaint_overdue' THEN '投诉超时未处理'
        ELSE kind END;
COMMENT ON FUNCTION pbx_violation_label(text) IS '违规类型的中文名称 / Chinese label of a violation kind';

CREATE VIEW bridge_zone AS
    SELECT coalesce((SELECT timezone FROM bridge_settings LIMIT 1), 'Asia/Shanghai') AS timezone;

-- Every customer call (probes excluded) with its local time, sheet and matching key.
CREATE VIEW call_facts AS
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
       pbx_number_key(c.caller_number) AS caller_key
FROM calls c
CROSS JOIN bridge_zone z
LEFT JOIN call_notes n ON n.linkedid = c.linkedid
WHERE NOT c.is_probe;

-- Answered calls placed from any line of the PBX other than the hotline (CEL, written by
-- Asterisk itself): the first channel of a linkedid dialled digits and another channel of
-- it answered. Used to recognise callbacks.
CREATE INDEX cel_answers ON cel (linkedid, eventtime) WHERE eventtype = 'ANSWER';
CREATE INDEX cel_originators ON cel (linkedid) WHERE eventtype = 'CHAN_START' AND uniqueid = linkedid;
CREATE VIEW outbound_answered AS
SELECT o.linkedid,
       pbx_number_key(o.exten) AS dialled_key,
       min(a.eventtime) AT TIME ZONE 'UTC' AS answered_at
FROM cel o
JOIN cel a ON a.linkedid = o.linkedid AND a.eventtype = 'ANSWER' AND a.uniqueid <> o.uniqueid
WHERE o.eventtype = 'CHAN_START' AND o.uniqueid = o.linkedid AND pbx_number_key(o.exten) IS NOT NULL
GROUP BY o.linkedid, o.exten;

-- ---------------------------------------------------------------------------------------
CREATE VIEW v_call_log AS
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
       f.linkedid
FROM call_facts f
ORDER BY f.started_at DESC;

COMMENT ON VIEW v_call_log IS '通话日志:每通来电一行(不含测拨),本地时间,最新在前 / call log: one line per customer call (probes excluded), local time, newest first';
COMMENT ON COLUMN v_call_log.started IS '来电时间(本地)/ when the call arrived (local time)';
COMMENT ON COLUMN v_call_log.day IS '日期(本地)/ local date of the call';
COMMENT ON COLUMN v_call_log.hotline_number IS '被叫400号码 / the hotline number called';
COMMENT ON COLUMN v_call_log.caller_number IS '来电号码 / caller number as the carrier delivered it';
COMMENT ON COLUMN v_call_log.caller_name IS '来电名称(网络提供)/ caller name from the network';
COMMENT ON COLUMN v_call_log.after_hours IS '是否非工作时间 / arrived outside business hours';
COMMENT ON COLUMN v_call_log.disposition IS '通话结果代码 / disposition code: answered, abandoned, missed, forwarded, forward_missed, voicemail';
COMMENT ON COLUMN v_call_log.result IS '通话结果 / disposition in Chinese';
COMMENT ON COLUMN v_call_log.answered_by IS '接听分机或客服手机号 / phone that answered (agent endpoint or duty mobile number)';
COMMENT ON COLUMN v_call_log.answered_stage IS '接听环节:group 三响内组振, escalation 全员振铃, mobile 客服手机 / stage that answered';
COMMENT ON COLUMN v_call_log.duty_holder IS '客服手机保管人 / who held the duty mobile';
COMMENT ON COLUMN v_call_log.ring_seconds IS '坐席振铃时长(秒)/ seconds the agents'' phones rang';
COMMENT ON COLUMN v_call_log.rings IS '响铃次数 / rings heard';
COMMENT ON COLUMN v_call_log.within_ring_limit IS '是否三响内接听(空:来电方在时限内挂断)/ answered within the ring limit (null: caller left before it)';
COMMENT ON COLUMN v_call_log.talk_seconds IS '通话时长(秒)/ talk time in seconds';
COMMENT ON COLUMN v_call_log.ended IS '结束时间(本地)/ when the call ended (local time)';
COMMENT ON COLUMN v_call_log.has_sheet IS '是否已填接听记录单 / the call sheet has been filled';
COMMENT ON COLUMN v_call_log.sheet_category IS '记录单问题类型 / call sheet category';
COMMENT ON COLUMN v_call_log.sheet_status IS '记录单跟进状态 / call sheet follow-up status';
COMMENT ON COLUMN v_call_log.hangup_cause IS '挂断原因 / hangup cause';
COMMENT ON COLUMN v_call_log.linkedid IS '通话编号(Asterisk linkedid)/ call id';

-- ---------------------------------------------------------------------------------------
CREATE VIEW v_daily_kpi AS
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
           count(*) FILTER (WHERE disposition IS NULL AND answered_at IS NULL) AS unfinished
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
       coalesce(v.complaint_overdue, 0) AS complaint_overdue_violations
FROM per_day d
FULL JOIN violations v ON v.day = d.day
ORDER BY 1 DESC;

COMMENT ON VIEW v_daily_kpi IS '每日指标(本地日期,不含测拨),最新在前 / daily KPIs per local day (probes excluded), newest first';
COMMENT ON COLUMN v_daily_kpi.day IS '日期(本地)/ local date';
COMMENT ON COLUMN v_daily_kpi.calls IS '来电总数 / calls';
COMMENT ON COLUMN v_daily_kpi.answered IS '接通数(坐席或客服手机)/ calls answered (agents or duty mobile)';
COMMENT ON COLUMN v_daily_kpi.answer_rate_pct IS '接通率 % = 接通数 / 来电总数 / answer rate in percent';
COMMENT ON COLUMN v_daily_kpi.within_ring_limit_pct IS '三响内接听率 % = 三响内接听 / (三响内接听 + 超过三响);来电方在三响内挂断的不计 / share of calls answered within the ring limit among calls answered or rung past it, in percent';
COMMENT ON COLUMN v_daily_kpi.avg_ring_seconds IS '平均振铃时长(秒,坐席接听的来电)/ average seconds to answer at the agents'' phones';
COMMENT ON COLUMN v_daily_kpi.p90_ring_seconds IS '90% 坐席接听的来电在此秒数内接听(实际观测值)/ 90 % of the agents'' answers came within this many seconds (an observed value, not interpolated)';
COMMENT ON COLUMN v_daily_kpi.abandoned IS '来电方接听前挂断数 / calls the caller hung up before anyone answered';
COMMENT ON COLUMN v_daily_kpi.missed IS '未接数(未接、转手机未接、语音留言)/ calls nobody answered that the caller did not abandon (missed, forward_missed, voicemail)';
COMMENT ON COLUMN v_daily_kpi.unfinished IS '未结束或结束未被记录的来电(进行中,或AMI中断时丢失结束)/ calls with no recorded end: in progress, or their end was lost in an AMI gap; calls = answered + abandoned + missed + unfinished';
COMMENT ON COLUMN v_daily_kpi.voicemail IS '语音留言数(未接数的一部分)/ calls that ended in voicemail (part of missed)';
COMMENT ON COLUMN v_daily_kpi.after_hours_calls IS '非工作时间来电数 / calls outside business hours';
COMMENT ON COLUMN v_daily_kpi.after_hours_mobile_answered IS '非工作时间客服手机接听数 / after-hours calls the duty mobile answered';
COMMENT ON COLUMN v_daily_kpi.avg_talk_seconds IS '平均处理时间(平均通话秒数)/ average handle (talk) time of answered calls, seconds';
COMMENT ON COLUMN v_daily_kpi.sheets IS '已填接听记录单数 / calls with a filled call sheet';
COMMENT ON COLUMN v_daily_kpi.sheet_rate_pct IS '录入率 % = 已填记录单 / 来电总数 / recording rate in percent (sheets / calls)';
COMMENT ON COLUMN v_daily_kpi.ring_limit_violations IS '超过三响违规数 / ring-limit breaches';
COMMENT ON COLUMN v_daily_kpi.unanswered_violations IS '无人接听违规数 / unanswered-call breaches';
COMMENT ON COLUMN v_daily_kpi.outbound_attempt_violations IS '400线路外拨违规数 / attempts to dial out on the hotline';
COMMENT ON COLUMN v_daily_kpi.complaint_overdue_violations IS '投诉超时未处理数 / complaints not resolved in time';

-- ---------------------------------------------------------------------------------------
CREATE VIEW v_agent_daily AS
SELECT local_day AS day,
       answered_by AS agent,
       on_mobile AS duty_mobile,
       duty_holder,
       count(*) AS answered,
       round(avg(ring_seconds) FILTER (WHERE NOT on_mobile), 1) AS avg_ring_seconds,
       count(*) FILTER (WHERE within_ring_limit = false AND NOT on_mobile) AS ring_limit_breaches,
       round(coalesce(sum(talk_seconds), 0), 1) AS talk_seconds,
       round(avg(talk_seconds), 1) AS avg_talk_seconds,
       count(*) FILTER (WHERE has_sheet) AS sheets
FROM call_facts
WHERE answered_at IS NOT NULL AND answered_by IS NOT NULL
GROUP BY local_day, answered_by, on_mobile, duty_holder
ORDER BY day DESC, answered DESC, agent;

COMMENT ON VIEW v_agent_daily IS '每位坐席每日接听情况(客服手机按保管人另列)/ per agent per local day (the duty mobile per holder)';
COMMENT ON COLUMN v_agent_daily.day IS '日期(本地)/ local date';
COMMENT ON COLUMN v_agent_daily.agent IS '坐席分机,或客服手机号 / agent phone endpoint, or the duty mobile number';
COMMENT ON COLUMN v_agent_daily.duty_mobile IS '是否客服手机 / this row is the duty mobile';
COMMENT ON COLUMN v_agent_daily.duty_holder IS '客服手机保管人 / who held the duty mobile';
COMMENT ON COLUMN v_agent_daily.answered IS '接听数 / calls answered';
COMMENT ON COLUMN v_agent_daily.avg_ring_seconds IS '平均振铃时长(秒)/ average seconds the call rang before this agent answered';
COMMENT ON COLUMN v_agent_daily.ring_limit_breaches IS '超过三响才接听的次数 / calls answered after the ring limit';
COMMENT ON COLUMN v_agent_daily.talk_seconds IS '通话总时长(秒)/ total talk seconds';
COMMENT ON COLUMN v_agent_daily.avg_talk_seconds IS '平均处理时间(秒)/ average talk seconds';
COMMENT ON COLUMN v_agent_daily.sheets IS '已填接听记录单数 / of these calls, how many have a call sheet';

-- ---------------------------------------------------------------------------------------
CREATE VIEW v_callbacks_due AS
SELECT f.local_started::timestamp(0) AS called_at,
       f.caller_number,
       f.caller_name,
       f.disposition,
       pbx_disposition_label(f.disposition) AS result,
       f.after_hours,
       date_trunc('second', now() - coalesce(f.ended_at, f.started_at)) AS waiting,
       floor(extract(epoch FROM now() - coalesce(f.ended_at, f.started_at)) / 60)::integer AS waiting_minutes,
       count(*) OVER (PARTITION BY f.caller_key) AS due_calls_from_number,
       f.linkedid
FROM call_facts f
WHERE f.disposition IN ('missed', 'abandoned', 'voicemail', 'forward_missed')
  AND f.caller_key IS NOT NULL
  AND NOT EXISTS (SELECT 1 FROM call_facts later
                  WHERE later.caller_key = f.caller_key AND later.answered_at IS NOT NULL
                    AND later.started_at > f.started_at)
  AND NOT EXISTS (SELECT 1 FROM outbound_answered o
                  WHERE right(o.dialled_key, 5) = right(f.caller_key, 5)
                    AND o.dialled_key LIKE '%' || f.caller_key
                    AND o.answered_at > f.started_at)
ORDER BY f.started_at;

COMMENT ON VIEW v_callbacks_due IS '待回拨:未接、放弃、语音留言、转手机未接且尚未回拨的来电,最早在前。之后从非400线路外拨该号码并接通,或该号码再次来电并接通,即视为已回拨 / calls still to be called back, oldest first; a later answered call from any non-hotline line to the number, or a later answered call from it, clears one';
COMMENT ON COLUMN v_callbacks_due.called_at IS '来电时间(本地)/ when the customer called (local time)';
COMMENT ON COLUMN v_callbacks_due.caller_number IS '回拨号码 / number to call back';
COMMENT ON COLUMN v_callbacks_due.caller_name IS '来电名称 / caller name from the network';
COMMENT ON COLUMN v_callbacks_due.disposition IS '通话结果代码 / disposition code';
COMMENT ON COLUMN v_callbacks_due.result IS '通话结果 / disposition in Chinese';
COMMENT ON COLUMN v_callbacks_due.after_hours IS '是否非工作时间 / arrived outside business hours';
COMMENT ON COLUMN v_callbacks_due.waiting IS '已等待时长 / how long the customer has been waiting since the call ended';
COMMENT ON COLUMN v_callbacks_due.waiting_minutes IS '已等待分钟数 / the same, in whole minutes';
COMMENT ON COLUMN v_callbacks_due.due_calls_from_number IS '该号码待回拨的来电数 / calls from this number still due a callback';
COMMENT ON COLUMN v_callbacks_due.linkedid IS '通话编号 / call id';

-- ---------------------------------------------------------------------------------------
CREATE VIEW v_violations AS
SELECT (v.occurred_at AT TIME ZONE z.timezone)::timestamp(0) AS occurred,
       coalesce((c.started_at AT TIME ZONE z.timezone)::date, (v.occurred_at AT TIME ZONE z.timezone)::date) AS day,
       v.kind,
       pbx_violation_label(v.kind) AS violation,
       c.caller_number,
       c.caller_name,
       c.answered_by,
       coalesce(v.details ->> 'digits', v.details ->> 'owner') AS subject,
       v.details,
       v.linkedid,
       v.id
FROM policy_violations v
CROSS JOIN bridge_zone z
LEFT JOIN calls c ON c.linkedid = v.linkedid
WHERE NOT coalesce(c.is_probe, false)
ORDER BY v.occurred_at DESC, v.id DESC;

COMMENT ON VIEW v_violations IS '违规记录(不含测拨),最新在前 / rule breaches (probes excluded), newest first';
COMMENT ON COLUMN v_violations.occurred IS '发生时间(本地)/ when it happened (local time)';
COMMENT ON COLUMN v_violations.day IS '所属日期(本地):有关来电的日期,否则发生日期,与 v_daily_kpi 一致 / local day it counts on: its call''s day, else the day it happened (as in v_daily_kpi)';
COMMENT ON COLUMN v_violations.kind IS '违规类型代码:ring_limit, unanswered, outbound_attempt, complaint_overdue / kind code';
COMMENT ON COLUMN v_violations.violation IS '违规类型 / kind in Chinese';
COMMENT ON COLUMN v_violations.caller_number IS '来电号码(与来电有关时)/ caller number, when about a call';
COMMENT ON COLUMN v_violations.caller_name IS '来电名称 / caller name';
COMMENT ON COLUMN v_violations.answered_by IS '接听人 / who answered the call, if anyone';
COMMENT ON COLUMN v_violations.subject IS '外拨号码或投诉跟进人 / digits dialled out, or the complaint''s owner';
COMMENT ON COLUMN v_violations.details IS '详细信息(JSON)/ details as JSON';
COMMENT ON COLUMN v_violations.linkedid IS '通话编号 / call id';
COMMENT ON COLUMN v_violations.id IS '记录编号 / violation id';

-- ---------------------------------------------------------------------------------------
CREATE VIEW v_line_health AS
WITH last_probe AS (
    SELECT * FROM line_probes ORDER BY finished_at DESC, id DESC LIMIT 1
), last_call AS (
    SELECT max(started_at) AS at FROM calls WHERE NOT is_probe
), today AS (
    SELECT count(*) FILTER (WHERE p.outcome = 'ok') AS ok,
           count(*) FILTER (WHERE p.outcome <> 'ok') AS failed
    FROM line_probes p CROSS JOIN bridge_zone z
    WHERE (p.started_at AT TIME ZONE z.timezone)::date = (now() AT TIME ZONE z.timezone)::date
), state AS (
    SELECT CASE
               WHEN p.finished_at IS NULL AND lc.at IS NULL THEN 'unknown'
               WHEN p.finished_at IS NULL OR lc.at > p.finished_at THEN 'ok'
               WHEN p.outcome = 'ok' THEN 'ok'
               ELSE 'failing' END AS code,
           CASE WHEN lc.at IS NOT NULL AND (p.finished_at IS NULL OR lc.at > p.finished_at) THEN 'call'
                WHEN p.finished_at IS NOT NULL THEN 'probe' END AS evidence
    FROM last_call lc LEFT JOIN last_probe p ON true
)
SELECT s.code AS state,
       CASE s.code WHEN 'ok' THEN '正常' WHEN 'failing' THEN '故障' ELSE '未知' END AS state_label,
       s.evidence,
       (p.started_at AT TIME ZONE z.timezone)::timestamp(0) AS last_probe_at,
       p.trigger AS last_probe_trigger,
       p.outcome AS last_probe_outcome,
       p.delay_ms AS last_probe_delay_ms,
       p.reason AS last_probe_reason,
       (SELECT (max(started_at) AT TIME ZONE z.timezone)::timestamp(0) FROM line_probes WHERE outcome = 'ok')
           AS last_ok_probe_at,
       (lc.at AT TIME ZONE z.timezone)::timestamp(0) AS last_call_at,
       floor(extract(epoch FROM now() - lc.at) / 60)::integer AS minutes_since_last_call,
       t.ok AS probes_ok_today,
       t.failed AS probes_failed_today
FROM state s
CROSS JOIN bridge_zone z
CROSS JOIN last_call lc
CROSS JOIN today t
LEFT JOIN last_probe p ON true;

COMMENT ON VIEW v_line_health IS '线路状况(一行):最近测拨、最近真实来电、当前判断 / line health in one row: last probe, last real call, current state';
COMMENT ON COLUMN v_line_health.state IS '当前状态代码:ok / failing / unknown。以最近的证据为准:最近一次测拨结果,或之后的真实来电 / current state from the latest evidence: the last probe, or a real call after it';
COMMENT ON COLUMN v_line_health.state_label IS '当前状态:正常/故障/未知 / current state in Chinese';
COMMENT ON COLUMN v_line_health.evidence IS '判断依据:probe 测拨 / call 真实来电 / what the state is based on';
COMMENT ON COLUMN v_line_health.last_probe_at IS '最近测拨时间(本地)/ last probe attempt (local time)';
COMMENT ON COLUMN v_line_health.last_probe_trigger IS '最近测拨原因:quiet 长时间无来电 / daily 每日8:00 / manual 手动 / why it ran';
COMMENT ON COLUMN v_line_health.last_probe_outcome IS '最近测拨结果:ok, no_arrival, dial_failed, timeout / its outcome';
COMMENT ON COLUMN v_line_health.last_probe_delay_ms IS '测拨从拨出到到达400号码的毫秒数 / dial-to-arrival milliseconds';
COMMENT ON COLUMN v_line_health.last_probe_reason IS '失败原因 / failure reason from Asterisk';
COMMENT ON COLUMN v_line_health.last_ok_probe_at IS '最近一次成功测拨(本地)/ last successful probe (local time)';
COMMENT ON COLUMN v_line_health.last_call_at IS '最近真实来电(本地)/ last customer call (local time)';
COMMENT ON COLUMN v_line_health.minutes_since_last_call IS '距最近真实来电的分钟数 / minutes since the last customer call';
COMMENT ON COLUMN v_line_health.probes_ok_today IS '今日成功测拨次数 / successful probe attempts today';
COMMENT ON COLUMN v_line_health.probes_failed_today IS '今日失败测拨次数 / failed probe attempts today';

-- ---------------------------------------------------------------------------------------
CREATE VIEW v_unrecorded_calls AS
SELECT f.local_started::timestamp(0) AS started,
       f.caller_number,
       f.caller_name,
       f.answered_by,
       f.on_mobile AS answered_on_mobile,
       f.duty_holder,
       f.talk_seconds,
       floor(extract(epoch FROM now() - coalesce(f.ended_at, f.started_at)) / 60)::integer AS minutes_since_call,
       f.linkedid
FROM call_facts f
WHERE f.answered_at IS NOT NULL AND NOT f.has_sheet
ORDER BY f.started_at;

COMMENT ON VIEW v_unrecorded_calls IS '尚未填写接听记录单的已接来电(含客服手机接听、需事后补录的),最早在前 / answered calls whose call sheet is still missing (including those taken on the duty mobile), oldest first';
COMMENT ON COLUMN v_unrecorded_calls.started IS '来电时间(本地)/ when the call arrived (local time)';
COMMENT ON COLUMN v_unrecorded_calls.caller_number IS '来电号码 / caller number';
COMMENT ON COLUMN v_unrecorded_calls.caller_name IS '来电名称 / caller name';
COMMENT ON COLUMN v_unrecorded_calls.answered_by IS '接听人(分机或客服手机号)/ who answered';
COMMENT ON COLUMN v_unrecorded_calls.answered_on_mobile IS '是否客服手机接听(事后补录)/ taken on the duty mobile: fill in afterwards';
COMMENT ON COLUMN v_unrecorded_calls.duty_holder IS '客服手机保管人 / who held the duty mobile';
COMMENT ON COLUMN v_unrecorded_calls.talk_seconds IS '通话时长(秒)/ talk seconds';
COMMENT ON COLUMN v_unrecorded_calls.minutes_since_call IS '距通话结束分钟数 / minutes since the call ended';
COMMENT ON COLUMN v_unrecorded_calls.linkedid IS '通话编号(填写记录单时使用)/ call id (PUT /calls/{linkedid}/note)';

-- ---------------------------------------------------------------------------------------
CREATE VIEW v_hourly_load AS
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

COMMENT ON VIEW v_hourly_load IS '每小时话务量(本地时间,用于排班)/ calls per local hour, for staffing';
COMMENT ON COLUMN v_hourly_load.day IS '日期(本地)/ local date';
COMMENT ON COLUMN v_hourly_load.weekday IS '星期(1=周一 … 7=周日)/ ISO weekday, 1 = Monday';
COMMENT ON COLUMN v_hourly_load.hour IS '小时(0–23,本地)/ local hour the calls arrived in';
COMMENT ON COLUMN v_hourly_load.calls IS '来电数 / calls';
COMMENT ON COLUMN v_hourly_load.answered IS '接通数 / answered';
COMMENT ON COLUMN v_hourly_load.unanswered IS '未接通数(已结束)/ ended without an answer';
COMMENT ON COLUMN v_hourly_load.ring_limit_breaches IS '超过三响数 / calls that rang past the limit';
COMMENT ON COLUMN v_hourly_load.avg_ring_seconds IS '平均振铃时长(秒,坐席接听)/ average seconds to answer at the agents'' phones';
COMMENT ON COLUMN v_hourly_load.talk_minutes IS '通话总分钟数 / total talk minutes';

-- ---------------------------------------------------------------------------------------
-- The seed's 400热线电话接听记录单 (表1 客户来电记录表), one line per filled sheet.
CREATE VIEW v_call_sheet AS
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
       f.linkedid AS "通话编号"
FROM call_facts f
JOIN call_notes n ON n.linkedid = f.linkedid
ORDER BY f.started_at DESC;

COMMENT ON VIEW v_call_sheet IS '400热线电话接听记录单(已填写的),最新在前 / the call sheet form (filled sheets), newest first';
COMMENT ON COLUMN v_call_sheet."来电时间" IS '来电时间(本地)/ when the call arrived (local time)';
COMMENT ON COLUMN v_call_sheet."客户姓名" IS '客户姓名(未填时为来电名称)/ customer name (the network''s caller name if not filled)';
COMMENT ON COLUMN v_call_sheet."联系方式" IS '联系方式(未填时为来电号码)/ contact (the caller number if not filled)';
COMMENT ON COLUMN v_call_sheet."问题类型" IS '问题类型:咨询/投诉/建议/业务办理 / category';
COMMENT ON COLUMN v_call_sheet."问题描述摘要" IS '问题描述摘要 / summary of the issue';
COMMENT ON COLUMN v_call_sheet."处理结果" IS '处理结果/解决方案 / resolution';
COMMENT ON COLUMN v_call_sheet."跟进人" IS '跟进人 / owner';
COMMENT ON COLUMN v_call_sheet."跟进状态" IS '跟进状态:待处理/处理中/已完成 / follow-up status';
COMMENT ON COLUMN v_call_sheet."接听人" IS '接听人 / who answered the call';
COMMENT ON COLUMN v_call_sheet."最后修改时间" IS '记录单最后修改时间(本地)/ when the sheet was last changed (local time)';
COMMENT ON COLUMN v_call_sheet."最后修改人" IS '记录单最后修改人 / who last changed the sheet';
COMMENT ON COLUMN v_call_sheet."通话编号" IS '通话编号 / call id';

COMMENT ON VIEW bridge_zone IS '内部:视图使用的本地时区 / internal: the local time zone the views use';
COMMENT ON VIEW call_facts IS '内部:客户来电(不含测拨)及本地时间、记录单、号码比对键 / internal: customer calls with local time, sheet and number key';
COMMENT ON VIEW outbound_answered IS '内部:从本机非400线路外拨并接通的电话(取自 CEL)/ internal: answered calls placed from the PBX''s other lines (from CEL)';
