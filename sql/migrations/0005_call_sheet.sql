-- pbx-bridge 0005: the call sheet (接听记录单) with its change history, complaint deadlines,
-- and the settings the supervisor views read (written from the configuration by
-- `pbx-bridge migrate` and at every daemon start).

CREATE TABLE call_notes (
    linkedid     text PRIMARY KEY REFERENCES calls (linkedid) ON DELETE CASCADE,
    caller_name  text NOT NULL DEFAULT '' CHECK (length(caller_name) <= 100),
    contact      text NOT NULL DEFAULT '' CHECK (length(contact) <= 100),
    category     text NOT NULL CHECK (category IN ('咨询', '投诉', '建议', '业务办理')),
    summary      text NOT NULL CHECK (length(summary) BETWEEN 1 AND 2000),
    resolution   text NOT NULL DEFAULT '' CHECK (length(resolution) <= 4000),
    owner        text NOT NULL DEFAULT '' CHECK (length(owner) <= 100),
    status       text NOT NULL CHECK (status IN ('待处理', '处理中', '已完成')),
    version      integer NOT NULL DEFAULT 1 CHECK (version >= 1),
    created_at   timestamptz NOT NULL DEFAULT now(),
    created_by   text NOT NULL CHECK (length(created_by) BETWEEN 1 AND 100),
    updated_at   timestamptz NOT NULL DEFAULT now(),
    updated_by   text NOT NULL CHECK (length(updated_by) BETWEEN 1 AND 100),
    completed_at timestamptz,          -- when the status last became 已完成 (null while open)
    CHECK ((status = '已完成') = (completed_at IS NOT NULL))
);
CREATE INDEX call_notes_open_complaints ON call_notes (linkedid) WHERE category = '投诉';

COMMENT ON TABLE call_notes IS '接听记录单(每通电话一张,坐席填写)/ the call sheet agents fill in for a call';
COMMENT ON COLUMN call_notes.caller_name IS '客户姓名 / customer name as the agent noted it';
COMMENT ON COLUMN call_notes.contact IS '联系方式 / how to reach the customer';
COMMENT ON COLUMN call_notes.category IS '问题类型:咨询/投诉/建议/业务办理 / category: enquiry, complaint, suggestion, service request';
COMMENT ON COLUMN call_notes.summary IS '问题描述摘要 / summary of the issue';
COMMENT ON COLUMN call_notes.resolution IS '处理结果/解决方案 / what was done about it';
COMMENT ON COLUMN call_notes.owner IS '跟进人 / who follows it up';
COMMENT ON COLUMN call_notes.status IS '跟进状态:待处理/处理中/已完成 / follow-up status: open, in progress, done';
COMMENT ON COLUMN call_notes.completed_at IS '状态变为已完成的时间 / when the status became done (null while not done)';

-- Every change to a sheet: who, when, and each changed field's old and new value.
CREATE TABLE call_note_history (
    id         bigserial PRIMARY KEY,
    linkedid   text NOT NULL REFERENCES calls (linkedid) ON DELETE CASCADE,
    version    integer NOT NULL,
    changed_at timestamptz NOT NULL DEFAULT now(),
    changed_by text NOT NULL,
    changes    jsonb NOT NULL,  -- {"field": {"old": ..., "new": ...}}; a new sheet has old = null
    UNIQUE (linkedid, version)
);
COMMENT ON TABLE call_note_history IS '接听记录单修改历史 / every change to a call sheet: who, when, old and new values';

ALTER TABLE policy_violations DROP CONSTRAINT policy_violations_kind_check;
ALTER TABLE policy_violations ADD CONSTRAINT policy_violations_kind_check
    CHECK (kind IN ('ring_limit', 'outbound_attempt', 'unanswered', 'complaint_overdue'));
COMMENT ON TABLE policy_violations IS '违规记录:超过三响、外拨尝试、未接、投诉超时未处理 / rule breaches: ring limit, outbound attempts, unanswered calls, complaints not resolved in time';

-- One row: the configuration values the views need (they cannot read the TOML file).
CREATE TABLE bridge_settings (
    singleton               boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    timezone                text NOT NULL DEFAULT 'Asia/Shanghai',
    complaint_reply_minutes numeric(8, 2) NOT NULL DEFAULT 60 CHECK (complaint_reply_minutes > 0),
    updated_at              timestamptz NOT NULL DEFAULT now()
);
INSERT INTO bridge_settings DEFAULT VALUES;
COMMENT ON TABLE bridge_settings IS 'pbx-bridge 配置中视图需要的值(由 migrate 与守护进程写入)/ configuration values the views read, written by migrate and the daemon';

-- The daily report the daemon mails (seed 001: by 8:15 each morning), once per day.
CREATE TABLE report_deliveries (
    day        date PRIMARY KEY,               -- the local day the report covers
    sent_at    timestamptz NOT NULL DEFAULT now(),
    recipients text[] NOT NULL
);
COMMENT ON TABLE report_deliveries IS '已发送的日报 / daily reports mailed, one per day covered';
