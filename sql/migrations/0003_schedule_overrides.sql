-- pbx-bridge 0003: local exceptions to business hours, kept in the database so ops can add
-- them without a restart (pbx-bridge reads them every time it publishes the routing state).
CREATE TABLE schedule_overrides (
    day        date PRIMARY KEY,
    hours      text[] NOT NULL DEFAULT '{}',   -- e.g. {'09:00-12:00'}; empty = closed all day
    reason     text NOT NULL CHECK (length(reason) BETWEEN 1 AND 200),
    created_by text,
    created_at timestamptz NOT NULL DEFAULT now()
);
COMMENT ON TABLE schedule_overrides IS '营业时间例外(停业、临时营业、特殊时段)/ business-hours exceptions for single dates; they beat the configuration''s';
