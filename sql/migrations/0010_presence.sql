-- pbx-bridge 0010: agent presence (issue 15, 坐席签入签出). An agent signs out for a break (from
-- the phone, through the ops API, or automatically) and back in; each sign-out is a period, open
-- while the agent is out. One open period per agent at most (a partial unique index), so two
-- sign-outs of one agent cannot both be stored. Who acted: the phone's endpoint, or the name of
-- the API token used (never a name from a request body).

CREATE TABLE agent_presence (
    id               bigserial PRIMARY KEY,
    agent            text NOT NULL CHECK (agent ~ '^[A-Za-z0-9_.-]{1,64}$'),
    signed_out_at    timestamptz NOT NULL,
    signed_in_at     timestamptz CHECK (signed_in_at IS NULL OR signed_in_at >= signed_out_at),
    reason           text NOT NULL DEFAULT '' CHECK (length(reason) <= 100),
    set_by           text NOT NULL CHECK (set_by IN ('phone', 'api', 'auto')),
    signed_out_by    text NOT NULL DEFAULT '' CHECK (length(signed_out_by) <= 100),
    signed_in_by     text CHECK (length(signed_in_by) <= 100),
    signed_in_set_by text CHECK (signed_in_set_by IN ('phone', 'api', 'auto')),
    created_at       timestamptz NOT NULL DEFAULT now(),
    CHECK ((signed_in_at IS NULL) = (signed_in_set_by IS NULL)),
    CHECK ((signed_in_at IS NULL) = (signed_in_by IS NULL))
);
CREATE UNIQUE INDEX agent_presence_one_open ON agent_presence (agent) WHERE signed_in_at IS NULL;
CREATE INDEX agent_presence_agent_out ON agent_presence (agent, signed_out_at);

COMMENT ON TABLE agent_presence IS '坐席签出休息记录:每次签出一行,签入前为未结束 / agent sign-out periods (breaks): one row per sign-out, open until the agent signs back in';
COMMENT ON COLUMN agent_presence.agent IS '坐席分机(PJSIP 端点名)/ the agent''s PJSIP endpoint';
COMMENT ON COLUMN agent_presence.signed_out_at IS '签出时间 / when the agent signed out';
COMMENT ON COLUMN agent_presence.signed_in_at IS '签回时间(空:仍在签出中)/ when the agent signed back in (null: still out)';
COMMENT ON COLUMN agent_presence.reason IS '签出原因(可空)/ why, as given (may be empty)';
COMMENT ON COLUMN agent_presence.set_by IS '签出方式:phone 话机, api 运维接口, auto 自动 / how the sign-out was made';
COMMENT ON COLUMN agent_presence.signed_out_by IS '签出操作人:话机分机或 API 令牌名 / who signed out: the phone endpoint or the API token''s name';
COMMENT ON COLUMN agent_presence.signed_in_by IS '签入操作人:话机分机或 API 令牌名 / who signed back in: the phone endpoint or the API token''s name';
COMMENT ON COLUMN agent_presence.signed_in_set_by IS '签入方式:phone, api, auto / how the sign-in was made';

-- One row per agent ever signed out: the current state (the open period, else the latest one)
-- and today's time signed out (local day of bridge_zone; an open period counts until now()).
CREATE VIEW v_agent_presence AS
WITH today AS (
    SELECT z.timezone,
           (date_trunc('day', now() AT TIME ZONE z.timezone) AT TIME ZONE z.timezone) AS starts,
           now() AS now
    FROM bridge_zone z
), latest AS (
    SELECT DISTINCT ON (p.agent) p.agent, p.signed_out_at, p.signed_in_at, p.reason, p.set_by, p.signed_out_by,
           p.signed_in_by, p.signed_in_set_by
    FROM agent_presence p
    ORDER BY p.agent, (p.signed_in_at IS NULL) DESC, p.signed_out_at DESC, p.id DESC
), spent AS (
    SELECT p.agent,
           sum(extract(epoch FROM least(coalesce(p.signed_in_at, t.now), t.now)
                                  - greatest(p.signed_out_at, t.starts))) AS seconds,
           count(*) FILTER (WHERE p.signed_out_at >= t.starts) AS sign_outs
    FROM agent_presence p
    CROSS JOIN today t
    WHERE p.signed_out_at < t.now AND coalesce(p.signed_in_at, 'infinity') > t.starts
    GROUP BY p.agent
)
SELECT l.agent,
       CASE WHEN l.signed_in_at IS NULL THEN 'out' ELSE 'in' END AS state,
       CASE WHEN l.signed_in_at IS NULL THEN '签出休息' ELSE '已签入' END AS state_label,
       (coalesce(l.signed_in_at, l.signed_out_at) AT TIME ZONE t.timezone)::timestamp(0) AS since,
       CASE WHEN l.signed_in_at IS NULL THEN l.reason ELSE '' END AS reason,
       coalesce(l.signed_in_set_by, l.set_by) AS set_by,
       coalesce(l.signed_in_by, l.signed_out_by) AS changed_by,
       round(coalesce(s.seconds, 0) / 60, 1) AS signed_out_minutes_today,
       coalesce(s.sign_outs, 0) AS sign_outs_today
FROM latest l
CROSS JOIN today t
LEFT JOIN spent s ON s.agent = l.agent
ORDER BY (l.signed_in_at IS NULL) DESC, l.agent;

COMMENT ON VIEW v_agent_presence IS '坐席签入签出状态(每个签出过的坐席一行,签出中的在前)/ agent presence: one row per agent ever signed out, those out now first';
COMMENT ON COLUMN v_agent_presence.agent IS '坐席分机 / agent phone endpoint';
COMMENT ON COLUMN v_agent_presence.state IS '当前状态代码:out 签出休息 / in 已签入 / current state code';
COMMENT ON COLUMN v_agent_presence.state_label IS '当前状态:签出休息 / 已签入 / current state in Chinese';
COMMENT ON COLUMN v_agent_presence.since IS '当前状态开始时间(本地)/ since when (local time): the sign-out if out, else the last sign-in';
COMMENT ON COLUMN v_agent_presence.reason IS '签出原因(签入后为空)/ why the agent is out (empty when in)';
COMMENT ON COLUMN v_agent_presence.set_by IS '当前状态的设置方式:phone 话机, api 运维接口, auto 自动 / how the current state was set';
COMMENT ON COLUMN v_agent_presence.changed_by IS '当前状态的操作人:话机分机或 API 令牌名 / who set it: the phone endpoint or the API token''s name';
COMMENT ON COLUMN v_agent_presence.signed_out_minutes_today IS '今日签出总分钟数(本地日期,未签回的算到此刻)/ minutes signed out today (local day), an open sign-out counted until now';
COMMENT ON COLUMN v_agent_presence.sign_outs_today IS '今日签出次数 / sign-outs that began today (local day)';

GRANT SELECT ON v_agent_presence TO pbx_supervisor, pbx_bridge;
GRANT SELECT, INSERT, UPDATE ON agent_presence TO pbx_bridge;
GRANT USAGE ON SEQUENCE agent_presence_id_seq TO pbx_bridge;
