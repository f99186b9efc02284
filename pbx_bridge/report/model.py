"""The daily report's data and columns, and how a value reads as text (shared by every format)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import date, datetime, timedelta, tzinfo
from decimal import Decimal
from typing import Any, Literal
from zoneinfo import ZoneInfo

Row = Mapping[str, Any]
Kind = Literal["text", "count", "number", "bool", "time"]


class ReportError(Exception):
    """The report could not be mailed; the message names the mail server (never a password)."""


@dataclass(frozen=True)
class DailyReport:
    """One local day's figures, plus the line health and callbacks due as of `generated_at`."""

    day: date
    kpi: Row  # the v_daily_kpi row of `day` (zeros and empty rates when there were no calls)
    agents: tuple[Row, ...]  # v_agent_daily rows of `day`
    violations: tuple[Row, ...]  # v_violations rows of `day`, oldest first
    line_health: Row | None  # the v_line_health row (current)
    callbacks: tuple[Row, ...]  # every v_callbacks_due row (current), oldest first
    generated_at: datetime  # aware
    timezone: str = "Asia/Shanghai"  # the views' local time zone (bridge_settings)
    pbx: str = ""  # the PBX the figures are of (several may share the database)
    # For the charts (each left out when its data is empty): the day's calls per local hour
    # (v_hourly_load), the ring seconds of its calls that rang at the agents' phones (v_call_log),
    # the 7 days up to it (v_daily_kpi rows, oldest first), and the ring limit to mark (seconds).
    hourly: tuple[Row, ...] = ()
    ring_seconds: tuple[float, ...] = ()
    week: tuple[Row, ...] = ()
    ring_limit_seconds: float = 15.0


@dataclass(frozen=True, slots=True)
class Column:
    """A column of a report table: the view's column name and its bilingual heading."""

    key: str
    zh: str
    en: str
    kind: Kind = "text"

    @property
    def heading(self) -> str:
        """The heading as one line: Chinese, then English."""
        return f"{self.zh} {self.en}"


KPI_COLUMNS = (
    Column("calls", "来电总数", "calls", "count"),
    Column("answered", "接通数", "answered", "count"),
    Column("answer_rate_pct", "接通率", "answer rate %", "number"),
    Column("within_ring_limit_pct", "三响内接听率", "answered within the ring limit %", "number"),
    Column("avg_ring_seconds", "平均振铃时长", "average ring, s", "number"),
    Column("p90_ring_seconds", "90%来电振铃不超过", "90th percentile ring, s", "number"),
    Column("abandoned", "来电方挂断", "abandoned by the caller", "count"),
    Column("missed", "未接(含语音留言)", "missed (incl. voicemail)", "count"),
    Column("voicemail", "语音留言", "voicemail", "count"),
    Column("unfinished", "未记录结束", "no recorded end (in progress, or lost in an AMI gap)", "count"),
    Column("after_hours_calls", "非工作时间来电", "after-hours calls", "count"),
    Column("after_hours_mobile_answered", "非工作时间客服手机接听", "after hours, answered on the duty mobile",
           "count"),
    Column("avg_talk_seconds", "平均处理时间", "average handle time, s", "number"),
    Column("sheets", "已填接听记录单", "call sheets filled", "count"),
    Column("sheet_rate_pct", "录入率", "recording rate %", "number"),
    Column("ring_limit_violations", "超过三响违规", "ring-limit breaches", "count"),
    Column("unanswered_violations", "无人接听违规", "unanswered calls", "count"),
    Column("outbound_attempt_violations", "400线路外拨", "outbound attempts on the hotline", "count"),
    Column("complaint_overdue_violations", "投诉超时未处理", "complaints not resolved in time", "count"),
)
AGENT_COLUMNS = (
    Column("agent", "坐席", "agent"),
    Column("duty_mobile", "客服手机", "duty mobile", "bool"),
    Column("duty_holder", "保管人", "holder"),
    Column("answered", "接听数", "answered", "count"),
    Column("avg_ring_seconds", "平均振铃(秒)", "avg ring s", "number"),
    Column("ring_limit_breaches", "超过三响", "over limit", "count"),
    Column("talk_seconds", "通话总时长(秒)", "talk s", "number"),
    Column("avg_talk_seconds", "平均处理时间(秒)", "avg talk s", "number"),
    Column("sheets", "记录单", "sheets", "count"),
)
VIOLATION_COLUMNS = (
    Column("occurred", "时间", "time", "time"),
    Column("violation", "违规类型", "violation"),
    Column("kind", "代码", "code"),
    Column("caller_number", "来电号码", "caller number"),
    Column("caller_name", "来电名称", "caller name"),
    Column("answered_by", "接听人", "answered by"),
    Column("subject", "外拨号码/跟进人", "digits / owner"),
    Column("linkedid", "通话编号", "call id"),
)
LINE_HEALTH_COLUMNS = (
    Column("state_label", "线路状态", "line state"),
    Column("state", "状态代码", "state code"),
    Column("evidence", "判断依据", "based on"),
    Column("last_probe_at", "最近测拨", "last probe", "time"),
    Column("last_probe_trigger", "测拨原因", "probe trigger"),
    Column("last_probe_outcome", "测拨结果", "probe outcome"),
    Column("last_probe_delay_ms", "测拨到达(毫秒)", "dial to arrival, ms", "count"),
    Column("last_probe_reason", "失败原因", "failure reason"),
    Column("last_ok_probe_at", "最近成功测拨", "last successful probe", "time"),
    Column("last_call_at", "最近真实来电", "last customer call", "time"),
    Column("minutes_since_last_call", "距最近来电(分钟)", "minutes since that call", "count"),
    Column("probes_ok_today", "今日成功测拨", "probes ok today", "count"),
    Column("probes_failed_today", "今日失败测拨", "probes failed today", "count"),
)
CALLBACK_COLUMNS = (
    Column("called_at", "来电时间", "called at", "time"),
    Column("caller_number", "回拨号码", "number"),
    Column("caller_name", "来电名称", "caller name"),
    Column("result", "结果", "result"),
    Column("after_hours", "非工作时间", "after hours", "bool"),
    Column("waiting", "已等待", "waiting", "time"),
    Column("due_calls_from_number", "该号码待回拨", "due from number", "count"),
    Column("linkedid", "通话编号", "call id"),
)

TITLE_ZH, TITLE_EN = "400热线日报", "hotline daily report"


@dataclass(frozen=True)
class Section:
    zh: str
    en: str
    columns: tuple[Column, ...]
    rows: tuple[Row, ...]
    vertical: bool = False  # one record shown as "heading: value" lines
    note: str = ""
    meta: bool = False  # the CSV's "report" section (text and HTML show it as a header)

    @property
    def title(self) -> str:
        return f"{self.zh} {self.en}"


# ---------------------------------------------------------------------------------------------
# Formatting values


def format_value(value: Any, zone: tzinfo) -> str | None:
    """A cell's text; None when the value is missing (each renderer shows that its own way)."""
    if value is None:
        return None
    if isinstance(value, bool):
        return "是" if value else "否"
    if isinstance(value, Decimal):
        return f"{value:f}"
    if isinstance(value, float):
        return f"{value:.1f}"
    if isinstance(value, datetime):
        if value.tzinfo is not None:
            value = value.astimezone(zone)
        return f"{value:%Y-%m-%d %H:%M:%S}"
    if isinstance(value, date):
        return value.isoformat()
    if isinstance(value, timedelta):
        seconds = int(value.total_seconds())
        sign, seconds = ("-" if seconds < 0 else ""), abs(seconds)
        days, rest = divmod(seconds, 86400)
        clock = f"{rest // 3600:02d}:{rest % 3600 // 60:02d}:{rest % 60:02d}"
        return sign + (f"{days}天 {clock}" if days else clock)
    if isinstance(value, dict | list):
        return json.dumps(value, ensure_ascii=False)
    return str(value)


def sections(report: DailyReport) -> list[Section]:
    zone = ZoneInfo(report.timezone)
    meta = {"day": report.day, "timezone": report.timezone, "generated_at": report.generated_at.astimezone(zone)}
    meta_columns = (Column("day", "日期", "day", "time"), Column("timezone", "时区", "time zone"),
                    Column("generated_at", "生成时间", "generated at", "time"))
    health = (report.line_health,) if report.line_health is not None else ()
    return [
        Section("报告", "report", meta_columns, (meta,), vertical=True, meta=True),
        Section("每日指标", "daily KPIs", KPI_COLUMNS, (report.kpi,), vertical=True),
        Section("坐席接听", "answered by agent", AGENT_COLUMNS, report.agents),
        Section("违规记录", "violations", VIOLATION_COLUMNS, report.violations),
        Section("线路状况", "line health", LINE_HEALTH_COLUMNS, health, vertical=True,
                 note="生成报告时 as of the report's generation"),
        Section("待回拨", "callbacks due", CALLBACK_COLUMNS, report.callbacks,
                 note="生成报告时全部 all still due when the report was made, oldest first"),
    ]


def subject(report: DailyReport) -> str:
    """The mail's subject: title, day and, when known, the PBX (each PBX mails its own report)."""
    site = f" [{report.pbx}]" if report.pbx else ""
    return f"{TITLE_ZH} {report.day.isoformat()}{site} / {TITLE_EN}"
