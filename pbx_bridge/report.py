"""The daily management report (seed 001): the supervisor views' figures as text, CSV or HTML, mailed daily.

A report covers one local day (the views' `day` column, in `bridge_settings.timezone`): that
day's KPIs (v_daily_kpi), answers per agent (v_agent_daily) and violations (v_violations); and,
as they stand when it is made, the line health (v_line_health) and every callback still due
(v_callbacks_due). Headings are bilingual, Chinese first ("接通率 answer rate").

CSV layout (`render_csv`, RFC 4180, one table after another): each section is a title row (one
cell, e.g. "坐席接听 answered by agent"), a header row, its data rows (none if empty), and one
empty row before the next section. The first section, "报告 report", names the day, the time
zone and when it was made. Numbers carry no unit (the header names it); missing values are
empty cells; a text cell a spreadsheet would run as a formula (it starts with = + - @ and is not
a plain number) gets a leading apostrophe. Mailed as an attachment, the CSV is UTF-8 with a BOM
so that Excel shows the Chinese.
"""

from __future__ import annotations

import asyncio
import csv
import html
import io
import json
import re
import smtplib
import ssl
import unicodedata
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta, tzinfo
from decimal import Decimal
from email.message import EmailMessage
from email.utils import format_datetime, make_msgid
from typing import Any, Literal
from zoneinfo import ZoneInfo

import asyncpg
import structlog

from pbx_bridge.aio import wait_set
from pbx_bridge.config import ReportSettings, SmtpSettings
from pbx_bridge.routing import Clock

log = structlog.get_logger("pbx_bridge.report")

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
class _Section:
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
# Reading the views


async def build_report(conn: asyncpg.Connection, day: date, *, generated_at: datetime | None = None) -> DailyReport:
    """Read the report of local `day` from the supervisor views (what role pbx_bridge may SELECT)."""
    generated_at = generated_at or datetime.now(UTC)
    async with conn.transaction(isolation="repeatable_read", readonly=True):  # one snapshot for every section
        timezone = await conn.fetchval("SELECT timezone FROM bridge_settings LIMIT 1") or "Asia/Shanghai"
        kpi = await conn.fetchrow(
            """SELECT day, calls, answered, answer_rate_pct, within_ring_limit_pct, avg_ring_seconds,
                      p90_ring_seconds, abandoned, missed, voicemail, unfinished, after_hours_calls,
                      after_hours_mobile_answered,
                      avg_talk_seconds, sheets, sheet_rate_pct, ring_limit_violations, unanswered_violations,
                      outbound_attempt_violations, complaint_overdue_violations
               FROM v_daily_kpi WHERE day = $1""", day)
        agents = await conn.fetch(
            """SELECT agent, duty_mobile, duty_holder, answered, avg_ring_seconds, ring_limit_breaches, talk_seconds,
                      avg_talk_seconds, sheets
               FROM v_agent_daily WHERE day = $1 ORDER BY answered DESC, duty_mobile, agent""", day)
        violations = await conn.fetch(
            """SELECT occurred, kind, violation, caller_number, caller_name, answered_by, subject, linkedid
               FROM v_violations WHERE day = $1 ORDER BY occurred, id""", day)
        line_health = await conn.fetchrow(
            """SELECT state, state_label, evidence, last_probe_at, last_probe_trigger, last_probe_outcome,
                      last_probe_delay_ms, last_probe_reason, last_ok_probe_at, last_call_at, minutes_since_last_call,
                      probes_ok_today, probes_failed_today
               FROM v_line_health""")
        callbacks = await conn.fetch(
            """SELECT called_at, caller_number, caller_name, disposition, result, after_hours, waiting,
                      waiting_minutes, due_calls_from_number, linkedid
               FROM v_callbacks_due ORDER BY called_at, linkedid""")
    return DailyReport(
        day=day,
        kpi=dict(kpi) if kpi is not None else _no_calls(day),
        agents=tuple(dict(r) for r in agents),
        violations=tuple(dict(r) for r in violations),
        line_health=dict(line_health) if line_health is not None else None,
        callbacks=tuple(dict(r) for r in callbacks),
        generated_at=generated_at,
        timezone=str(timezone),
    )


def _no_calls(day: date) -> dict[str, Any]:
    """The KPI row of a day without calls or violations: counts 0, rates and averages empty."""
    return {"day": day} | {c.key: 0 if c.kind == "count" else None for c in KPI_COLUMNS}


def default_day(now: datetime, zone: tzinfo) -> date:
    """The day a report is usually about: yesterday in local time (`now` must be aware)."""
    if now.tzinfo is None:
        raise ValueError("default_day needs an aware datetime")
    return now.astimezone(zone).date() - timedelta(days=1)


# ---------------------------------------------------------------------------------------------
# Formatting values


def _value(value: Any, zone: tzinfo) -> str | None:
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


def _sections(report: DailyReport) -> list[_Section]:
    zone = ZoneInfo(report.timezone)
    meta = {"day": report.day, "timezone": report.timezone, "generated_at": report.generated_at.astimezone(zone)}
    meta_columns = (Column("day", "日期", "day", "time"), Column("timezone", "时区", "time zone"),
                    Column("generated_at", "生成时间", "generated at", "time"))
    health = (report.line_health,) if report.line_health is not None else ()
    return [
        _Section("报告", "report", meta_columns, (meta,), vertical=True, meta=True),
        _Section("每日指标", "daily KPIs", KPI_COLUMNS, (report.kpi,), vertical=True),
        _Section("坐席接听", "answered by agent", AGENT_COLUMNS, report.agents),
        _Section("违规记录", "violations", VIOLATION_COLUMNS, report.violations),
        _Section("线路状况", "line health", LINE_HEALTH_COLUMNS, health, vertical=True,
                 note="生成报告时 as of the report's generation"),
        _Section("待回拨", "callbacks due", CALLBACK_COLUMNS, report.callbacks,
                 note="生成报告时全部 all still due when the report was made, oldest first"),
    ]


def _subject(report: DailyReport) -> str:
    return f"{TITLE_ZH} {report.day.isoformat()} / {TITLE_EN}"


# ---------------------------------------------------------------------------------------------
# Text

_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u200b-\u200f\u2028-\u202e\u2066-\u2069\ufeff]")
TEXT_CELL_MAX = 40


def _clean(text: str) -> str:
    """Terminal-safe: control, bidi and zero-width characters (from callers) become '?'."""
    return _CONTROL.sub("?", text)


def _width(text: str) -> int:
    """Columns the text takes in a terminal (CJK characters take two)."""
    width = 0
    for char in text:
        if unicodedata.combining(char):
            continue
        width += 2 if unicodedata.east_asian_width(char) in ("W", "F") else 1
    return width


def _truncate(text: str, limit: int) -> str:
    if _width(text) <= limit:
        return text
    out, used = [], 0
    for char in text:
        char_width = _width(char)
        if used + char_width > limit - 1:
            break
        out.append(char)
        used += char_width
    return "".join(out) + "…"


def _pad(text: str, width: int, right: bool = False) -> str:
    gap = " " * max(0, width - _width(text))
    return gap + text if right else text + gap


def _text_cell(row: Row, column: Column, zone: tzinfo) -> str:
    value = _value(row.get(column.key), zone)
    return "-" if value is None else _truncate(_clean(value), TEXT_CELL_MAX)


def render_text(report: DailyReport) -> str:
    """The report as aligned plain text, for a terminal or a plain-text mail."""
    zone = ZoneInfo(report.timezone)
    sections = _sections(report)
    generated = report.generated_at.astimezone(zone)
    lines = [f"{TITLE_ZH} {TITLE_EN}  {report.day.isoformat()}",
             f"时区 time zone {report.timezone} · 生成时间 generated at {generated:%Y-%m-%d %H:%M:%S}"]
    for section in sections:
        if section.meta:
            continue
        lines += ["", f"== {section.title} ==" + (f"  ({section.note})" if section.note else "")]
        if not section.rows:
            lines.append("  (无 none)")
        elif section.vertical:
            labels = [c.heading for c in section.columns]
            label_width = max(_width(label) for label in labels)
            values = [_text_cell(section.rows[0], c, zone) for c in section.columns]
            value_width = max(_width(v) for v in values)
            numeric = all(c.kind in ("count", "number") for c in section.columns)  # then right-aligned
            for label, value in zip(labels, values, strict=True):
                lines.append(f"  {_pad(label, label_width)}  {_pad(value, value_width, right=numeric)}".rstrip())
        else:
            lines += _text_table(section, zone)
    return "\n".join(lines) + "\n"


def _text_table(section: _Section, zone: tzinfo) -> list[str]:
    """Two heading lines (Chinese, English), a rule, then the rows; numbers right-aligned."""
    cells = [[_text_cell(row, c, zone) for c in section.columns] for row in section.rows]
    widths = [max([_width(c.zh), _width(c.en)] + [_width(r[i]) for r in cells])
              for i, c in enumerate(section.columns)]
    right = [c.kind in ("count", "number") for c in section.columns]

    def line(values: Sequence[str]) -> str:
        return ("  " + "  ".join(_pad(v, w, r) for v, w, r in zip(values, widths, right, strict=True))).rstrip()

    return [line([c.zh for c in section.columns]), line([c.en for c in section.columns]),
            line(["-" * w for w in widths])] + [line(r) for r in cells]


# ---------------------------------------------------------------------------------------------
# CSV

_PLAIN_NUMBER = re.compile(r"^[+-]?[0-9][0-9 .:()-]*$")


def _csv_cell(row: Row, column: Column, zone: tzinfo) -> str:
    value = _value(row.get(column.key), zone)
    if value is None:
        return ""
    if value[:1] in ("=", "+", "-", "@", "\t", "\r") and not _PLAIN_NUMBER.match(value):
        return "'" + value  # a spreadsheet would otherwise run it as a formula
    return value


def render_csv(report: DailyReport) -> str:
    """The report as CSV sections (title row, header row, data rows, empty row); see the module docstring."""
    zone = ZoneInfo(report.timezone)
    out = io.StringIO()
    writer = csv.writer(out)
    for index, section in enumerate(_sections(report)):
        if index:
            writer.writerow([])
        writer.writerow([section.title])
        if section.vertical:
            writer.writerow(["指标 item", "数值 value", "字段 field"])
            for row in section.rows:
                for column in section.columns:
                    writer.writerow([column.heading, _csv_cell(row, column, zone), column.key])
        else:
            writer.writerow([c.heading for c in section.columns])
            for row in section.rows:
                writer.writerow([_csv_cell(row, c, zone) for c in section.columns])
    return out.getvalue()


# ---------------------------------------------------------------------------------------------
# HTML

_TABLE = "border-collapse:collapse;margin:4px 0 16px 0;font-size:13px"
_TH = "border:1px solid #ccc;background:#f0f3f7;padding:4px 8px;text-align:left;vertical-align:bottom"
_TD = "border:1px solid #ddd;padding:4px 8px;vertical-align:top"
_EN = "color:#667;font-weight:normal;font-size:11px"


def _e(text: str) -> str:
    return html.escape(text, quote=True)


def _heading_html(column: Column) -> str:
    return f'{_e(column.zh)}<br><span style="{_EN}">{_e(column.en)}</span>'


def _html_cell(row: Row, column: Column, zone: tzinfo) -> str:
    value = _value(row.get(column.key), zone)
    align = "text-align:right;" if column.kind in ("count", "number") else ""
    return f'<td style="{align}{_TD}">{"–" if value is None else _e(value)}</td>'


def render_html(report: DailyReport) -> str:
    """The report as one self-contained HTML page (inline styles; every value escaped)."""
    zone = ZoneInfo(report.timezone)
    generated = report.generated_at.astimezone(zone)
    title = _e(_subject(report))
    parts = [
        '<!DOCTYPE html>\n<html lang="zh-CN"><head><meta charset="utf-8">'
        f"<title>{title}</title></head>\n"
        '<body style="font-family:-apple-system,\'Segoe UI\',\'PingFang SC\',\'Microsoft YaHei\',sans-serif;'
        'color:#222;margin:16px">\n',
        f'<h1 style="font-size:20px;margin:0 0 4px 0">{_e(TITLE_ZH)} <span style="{_EN};font-size:14px">'
        f"{_e(TITLE_EN)}</span> {_e(report.day.isoformat())}</h1>\n",
        f'<p style="color:#555;font-size:12px;margin:0 0 12px 0">时区 time zone {_e(report.timezone)} · '
        f"生成时间 generated at {_e(f'{generated:%Y-%m-%d %H:%M:%S}')}</p>\n",
    ]
    for section in _sections(report):
        if section.meta:
            continue
        note = f' <span style="{_EN}">({_e(section.note)})</span>' if section.note else ""
        parts.append(f'<h2 style="font-size:16px;margin:12px 0 4px 0">{_e(section.zh)} '
                     f'<span style="{_EN};font-size:13px">{_e(section.en)}</span>{note}</h2>\n')
        if not section.rows:
            parts.append('<p style="color:#555;font-size:13px">无 none</p>\n')
        elif section.vertical:
            rows = "".join(f'<tr><th style="{_TH}">{_heading_html(c)}</th>{_html_cell(section.rows[0], c, zone)}</tr>'
                           for c in section.columns)
            parts.append(f'<table style="{_TABLE}">{rows}</table>\n')
        else:
            head = "".join(f'<th style="{_TH}">{_heading_html(c)}</th>' for c in section.columns)
            body = "".join("<tr>" + "".join(_html_cell(row, c, zone) for c in section.columns) + "</tr>"
                           for row in section.rows)
            parts.append(f'<table style="{_TABLE}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>\n')
    parts.append("</body></html>\n")
    return "".join(parts)


# ---------------------------------------------------------------------------------------------
# Email


def attachment_name(day: date) -> str:
    """The CSV attachment's file name."""
    return f"hotline-report-{day.isoformat()}.csv"


def compose_email(report: DailyReport, smtp: SmtpSettings, recipients: list[str], main_format: str) -> EmailMessage:
    """The report mail: text (and HTML when `main_format` is "html") alternatives, the CSV attached."""
    if not recipients:
        raise ValueError("compose_email needs at least one recipient")
    message = EmailMessage()
    message["Subject"] = _subject(report)
    message["From"] = smtp.sender
    message["To"] = ", ".join(recipients)
    message["Date"] = format_datetime(report.generated_at.astimezone(UTC))
    message["Message-ID"] = make_msgid("pbx-bridge-report", domain=smtp.sender.rpartition("@")[2])
    message.set_content(render_text(report), subtype="plain", charset="utf-8", cte="base64")
    if main_format == "html":
        message.add_alternative(render_html(report), subtype="html", charset="utf-8", cte="base64")
    message.add_attachment(render_csv(report).encode("utf-8-sig"), maintype="text", subtype="csv",
                           filename=attachment_name(report.day))
    return message


def _smtp_detail(exc: BaseException, timeout: float) -> str:
    if isinstance(exc, smtplib.SMTPRecipientsRefused):
        return "every recipient was refused: " + ", ".join(
            f"{address} ({code} {reply.decode(errors='replace')})" for address, (code, reply) in exc.recipients.items())
    if isinstance(exc, smtplib.SMTPResponseException):
        reply = exc.smtp_error.decode(errors="replace") if isinstance(exc.smtp_error, bytes) else str(exc.smtp_error)
        return f"{type(exc).__name__}: {exc.smtp_code} {reply}"
    if isinstance(exc, TimeoutError):
        return f"no answer within {timeout:g} s"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def _deliver(smtp: SmtpSettings, message: EmailMessage, password: str | None) -> dict[str, tuple[int, bytes]]:
    """Blocking: connect, secure, log in, send. Returns the recipients refused (if only some were)."""
    assert smtp.host is not None
    context = ssl.create_default_context()
    client: smtplib.SMTP
    if smtp.security == "tls":
        client = smtplib.SMTP_SSL(smtp.host, smtp.port, timeout=smtp.timeout_seconds, context=context)
    else:
        client = smtplib.SMTP(smtp.host, smtp.port, timeout=smtp.timeout_seconds)
    with client:
        if smtp.security == "starttls":
            client.starttls(context=context)
        if smtp.username is not None:
            client.login(smtp.username, password or "")
        return client.send_message(message)


async def send_email(smtp: SmtpSettings, message: EmailMessage) -> None:
    """Send `message` through [smtp] (stdlib smtplib in a thread); ReportError naming the server on failure."""
    if smtp.host is None:
        raise ReportError("no mail server: set [smtp] host")
    server = f"{smtp.host}:{smtp.port}"
    try:
        secret = smtp.resolved_password()
    except ValueError as exc:
        raise ReportError(f"cannot send the report through the mail server {server}: {exc}") from None
    password = secret.get_secret_value() if secret is not None else None
    try:
        refused = await asyncio.to_thread(_deliver, smtp, message, password)
    except (smtplib.SMTPException, OSError) as exc:
        detail = _smtp_detail(exc, smtp.timeout_seconds)
        if password:
            detail = detail.replace(password, "***")
        raise ReportError(f"cannot send the report through the mail server {server} "
                          f"(security {smtp.security}): {detail}") from None
    if refused:
        log.warning("report_recipients_refused", server=server, refused=sorted(refused))


# ---------------------------------------------------------------------------------------------
# The daemon's daily mailing

RETRIED = (ReportError, OSError, asyncpg.PostgresError, asyncpg.InterfaceError)


class DailyReportScheduler:
    """Mails yesterday's report once a day from [report] daily_at (local time), recorded in report_deliveries.

    A day with a row in report_deliveries is never mailed again (a restart does not resend); a
    daemon that was down at daily_at mails when it comes back, the same day. A failure is logged
    and retried at the next check. Without recipients it does nothing.
    """

    name = "daily-report"  # its task's name (lifecycle.Service)

    def __init__(self, report: ReportSettings, smtp: SmtpSettings, zone: tzinfo, clock: Clock,
                 connect: Callable[[], Awaitable[asyncpg.Connection]], check_interval: float = 60.0) -> None:
        self._report = report
        self._smtp = smtp
        self._zone = zone
        self._clock = clock
        self._connect = connect
        self._interval = check_interval
        hour, minute = (int(part) for part in report.daily_at.split(":"))
        self._due = time(hour, minute)
        self._stop = asyncio.Event()
        self._last_sent_day: date | None = None
        self._last_error: str | None = None
        self._unrecorded: tuple[date, datetime, list[str]] | None = None  # mailed, not yet in report_deliveries

    @property
    def last_sent_day(self) -> date | None:
        """The latest day whose report this process mailed or found already mailed."""
        return self._last_sent_day

    @property
    def last_error(self) -> str | None:
        """Why the latest attempt failed; None once a report went out."""
        return self._last_error

    def stop(self) -> None:
        """Make `run` return at its next wait."""
        self._stop.set()

    async def run(self) -> None:
        """Check every `check_interval` seconds until stopped."""
        if not self._report.recipients:
            log.info("daily_report_off", reason="no [report] recipients")
            return
        while not self._stop.is_set():
            try:
                await self.check()
            except Exception as exc:  # a report bug must not stop call recording: seen, retried
                self._last_error = f"{type(exc).__name__}: {exc}"
                log.exception("daily_report_crashed", retry_in_seconds=self._interval)
            await wait_set(self._stop, self._interval)

    async def check(self) -> date | None:
        """One check: mail yesterday's report if it is due and not mailed yet; the day mailed, or None."""
        now = self._clock.now()
        if not self._report.recipients or now.astimezone(self._zone).time() < self._due:
            return None
        day = default_day(now, self._zone)
        if self._unrecorded is not None:
            await self._record_pending()
        if self._last_sent_day == day:
            return None
        recipients = list(self._report.recipients)
        try:
            conn = await self._connect()
            try:
                if await conn.fetchval("SELECT EXISTS (SELECT FROM report_deliveries WHERE day = $1)", day):
                    self._last_sent_day = day
                    return None
                report = await build_report(conn, day, generated_at=now)
            finally:
                await conn.close()
            await send_email(self._smtp, compose_email(report, self._smtp, recipients, self._report.format))
        except RETRIED as exc:
            self._last_error = str(exc) or type(exc).__name__
            log.error("daily_report_failed", day=day.isoformat(), error=self._last_error,
                      retry_in_seconds=self._interval)
            return None
        self._last_sent_day = day
        self._last_error = None
        log.info("daily_report_sent", day=day.isoformat(), recipients=len(recipients))
        self._unrecorded = (day, now, recipients)
        await self._record_pending()
        return day

    async def _record_pending(self) -> None:
        """Write the mailed day to report_deliveries; kept for the next check if the database fails."""
        assert self._unrecorded is not None
        day, sent_at, recipients = self._unrecorded
        try:
            conn = await self._connect()
            try:
                await conn.execute(
                    "INSERT INTO report_deliveries (day, sent_at, recipients) VALUES ($1, $2, $3) "
                    "ON CONFLICT (day) DO NOTHING", day, sent_at, recipients)
            finally:
                await conn.close()
        except RETRIED as exc:
            log.error("daily_report_not_recorded", day=day.isoformat(), error=str(exc) or type(exc).__name__)
            return
        self._unrecorded = None
