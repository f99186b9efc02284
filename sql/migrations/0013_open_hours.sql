-- pbx-bridge 0013: each local day's effective opening hours, as pbx-bridge applied them, and the
-- agents' signed-in time in v_agent_daily (issue 15). The views cannot compute the schedule (the
-- holiday calendar, 调休 and overrides live in pbx-bridge), so pbx-bridge publishes each day's
-- hours here: today's and tomorrow's are kept current, a past day is written once if missing
-- and then left as it was (it is history). A day with no row here has no signed-in time (NULL).

CREATE TABLE open_hours (
    day          date PRIMARY KEY,
    open         tstzmultirange NOT NULL,
    reason       text NOT NULL CHECK (length(reason) <= 200),
    published_at timestamptz NOT NULL DEFAULT now()
);
COMMENT ON TABLE open_hours IS '每日实际营业时间(节假日、调休、临时调整后),由 pbx-bridge 写入 / each local day''s effective opening hours, as pbx-bridge applied them';
COMMENT ON COLUMN open_hours.day IS '日期(本地)/ local date';
COMMENT ON COLUMN open_hours.open IS '营业时段 / the open periods of that day (empty: closed all day)';
COMMENT ON COLUMN open_hours.reason IS '依据:每周营业时间、法定节假日、调休或临时调整 / why: weekly hours, statutory holiday, adjusted working day or an override';

-- Seconds covered by a set of time ranges (bounded ranges only; an empty set is 0).
CREATE FUNCTION multirange_seconds(ranges tstzmultirange) RETURNS double precision
LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN (SELECT coalesce(sum(extract(epoch FROM upper(r) - lower(r))), 0) FROM unnest(ranges) AS u(r));

GRANT SELECT, INSERT, UPDATE ON open_hours TO pbx_bridge;
GRANT EXECUTE ON FUNCTION multirange_seconds(tstzmultirange) TO pbx_supervisor, pbx_bridge;

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
           l.talk_seconds, l.stage, l.answered_at, l.transferred_by, l.linkedid
    FROM call_legs l
    JOIN calls c ON c.linkedid = l.linkedid
    JOIN call_facts f ON f.linkedid = l.linkedid
), offered AS (  -- the customer calls an agent's phone rang for (transfers included), and those it answered
    SELECT day, agent, duty_mobile, duty_holder, count(DISTINCT linkedid) AS offered,
           count(DISTINCT linkedid) FILTER (WHERE answered_at IS NOT NULL) AS taken
    FROM people
    WHERE agent IS NOT NULL AND NOT duty_mobile
    GROUP BY 1, 2, 3, 4
), breaks AS (  -- minutes signed out per local day (an open break counted until now)
    SELECT (g.day_start AT TIME ZONE z.timezone)::date AS day, p.agent, false AS duty_mobile, NULL::text AS duty_holder,
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
    GROUP BY 1, 2
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
    UNION SELECT day, agent, duty_mobile, duty_holder FROM offered
    UNION SELECT day, agent, duty_mobile, duty_holder FROM breaks
), signed_in AS (  -- an agent's open hours (so far, today) minus the time signed out inside them
    SELECT p.day, p.agent,
           (multirange_seconds(h.open * so_far.until_now)
            - multirange_seconds(h.open * so_far.until_now * coalesce(o.out, '{}'::tstzmultirange))) / 60 AS minutes
    FROM persons p
    JOIN open_hours h ON h.day = p.day
    CROSS JOIN LATERAL (SELECT tstzmultirange(tstzrange(NULL, now())) AS until_now) AS so_far
    LEFT JOIN LATERAL (
        SELECT range_agg(tstzrange(a.signed_out_at, coalesce(a.signed_in_at, now()))) AS out
        FROM agent_presence a
        WHERE a.agent = p.agent AND a.signed_out_at < upper(h.open)
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
       round(s.minutes::numeric, 1) AS signed_in_minutes
FROM persons p
LEFT JOIN firsts f ON (f.day, f.agent, f.duty_mobile) = (p.day, p.agent, p.duty_mobile)
                  AND f.duty_holder IS NOT DISTINCT FROM p.duty_holder
LEFT JOIN talk t ON (t.day, t.agent, t.duty_mobile) = (p.day, p.agent, p.duty_mobile)
                AND t.duty_holder IS NOT DISTINCT FROM p.duty_holder
LEFT JOIN made m ON (m.day, m.agent, m.duty_mobile) = (p.day, p.agent, p.duty_mobile)
                AND m.duty_holder IS NOT DISTINCT FROM p.duty_holder
LEFT JOIN offered o ON (o.day, o.agent, o.duty_mobile) = (p.day, p.agent, p.duty_mobile)
                   AND o.duty_holder IS NOT DISTINCT FROM p.duty_holder
LEFT JOIN breaks b ON (b.day, b.agent, b.duty_mobile) = (p.day, p.agent, p.duty_mobile)
                  AND b.duty_holder IS NOT DISTINCT FROM p.duty_holder
LEFT JOIN signed_in s ON (s.day, s.agent) = (p.day, p.agent) AND NOT p.duty_mobile
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
COMMENT ON COLUMN v_agent_daily.calls_offered IS '振铃来电数(此人话机为之振铃的客户来电,含转接)/ customer calls this person''s phone rang for, transfers included';
COMMENT ON COLUMN v_agent_daily.answer_share_pct IS '接听率 % = 此人接起的来电 / 振铃来电数 / share of those calls this person answered (first or after a transfer), in percent';
COMMENT ON COLUMN v_agent_daily.break_minutes IS '签出休息分钟数(未签回的算到此刻)/ minutes signed out that day (an open break until now)';
COMMENT ON COLUMN v_agent_daily.signed_in_minutes IS '签入分钟数:当日营业时间(今天到此刻)减去其中签出的时间;当日营业时间未记录则为空 / minutes signed in: the day''s open hours (today: so far) minus the time signed out within them; null when that day''s hours were not recorded';
