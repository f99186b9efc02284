"""The daily report's renderings and mail, from a hand-built report (no database)."""

from __future__ import annotations

import asyncio
import csv
import io
import smtplib
import unicodedata
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from email.message import EmailMessage
from html.parser import HTMLParser
from typing import Any, ClassVar
from zoneinfo import ZoneInfo

import asyncpg
import pytest

from pbx_bridge import report as report_module
from pbx_bridge.config import ReportSettings, SmtpSettings
from pbx_bridge.report import (
    KPI_COLUMNS,
    DailyReport,
    DailyReportScheduler,
    ReportError,
    compose_email,
    default_day,
    render_csv,
    render_html,
    render_text,
    send_email,
)
from pbx_bridge.routing import Clock

SH = ZoneInfo("Asia/Shanghai")
EVIL = "<script>alert(1)</script> 张三 & \"O'Brien\""
FORMULA = '=HYPERLINK("http://evil.example","点我")'
DAY = date(2026, 11, 22)


def sample(**changes: Any) -> DailyReport:
    kpi = {"day": DAY, "calls": 7, "answered": 4, "answer_rate_pct": Decimal("57.1"),
           "within_ring_limit_pct": Decimal("50.0"), "avg_ring_seconds": Decimal("9.3"),
           "p90_ring_seconds": Decimal("15.0"), "abandoned": 2, "missed": 1, "voicemail": 1, "unfinished": 0,
           "after_hours_calls": 2,
           "after_hours_mobile_answered": 1, "avg_talk_seconds": Decimal("75.0"), "sheets": 2,
           "sheet_rate_pct": Decimal("28.6"), "ring_limit_violations": 2, "unanswered_violations": 1,
           "outbound_attempt_violations": 1, "complaint_overdue_violations": 1}
    agents = (
        {"agent": "agent101", "duty_mobile": False, "duty_holder": None, "answered": 2,
         "avg_ring_seconds": Decimal("5.5"), "ring_limit_breaches": 0, "talk_seconds": Decimal("210.0"),
         "avg_talk_seconds": Decimal("105.0"), "sheets": 1},
        {"agent": "13900139000", "duty_mobile": True, "duty_holder": "值班员小王", "answered": 1,
         "avg_ring_seconds": None, "ring_limit_breaches": 0, "talk_seconds": Decimal("30.0"),
         "avg_talk_seconds": Decimal("30.0"), "sheets": 1},
    )
    violations = (
        {"occurred": datetime(2026, 11, 22, 10, 15, 15), "kind": "ring_limit", "violation": "超过三响未接",
         "caller_number": "13800138001", "caller_name": EVIL, "answered_by": "agent102", "subject": None,
         "linkedid": "1700000000.1"},
        {"occurred": datetime(2026, 11, 22, 11, 0), "kind": "outbound_attempt", "violation": "400线路外拨",
         "caller_number": None, "caller_name": None, "answered_by": None, "subject": "013912345678",
         "linkedid": None},
    )
    health = {"state": "ok", "state_label": "正常", "evidence": "probe",
              "last_probe_at": datetime(2026, 11, 23, 8, 0, 0), "last_probe_trigger": "daily",
              "last_probe_outcome": "ok", "last_probe_delay_ms": 8, "last_probe_reason": None,
              "last_ok_probe_at": datetime(2026, 11, 23, 8, 0, 0), "last_call_at": datetime(2026, 11, 22, 23, 59),
              "minutes_since_last_call": 491, "probes_ok_today": 1, "probes_failed_today": 0}
    callbacks = (
        {"called_at": datetime(2026, 11, 22, 16, 0), "caller_number": "+86 135-0013-5000",
         "caller_name": FORMULA, "disposition": "abandoned", "result": "来电方挂断", "after_hours": False,
         "waiting": timedelta(hours=16, minutes=9, seconds=40), "waiting_minutes": 969,
         "due_calls_from_number": 1, "linkedid": "1700000000.5"},
        {"called_at": datetime(2026, 11, 20, 23, 59), "caller_number": "13600136000",
         "caller_name": "bad\x1b[2Jterminal\u202e", "disposition": "voicemail", "result": "语音留言",
         "after_hours": True, "waiting": timedelta(days=2, hours=8, minutes=10, seconds=20), "waiting_minutes": 3370,
         "due_calls_from_number": 2, "linkedid": "1700000000.6"},
    )
    values: dict[str, Any] = {
        "day": DAY, "kpi": kpi, "agents": agents, "violations": violations, "line_health": health,
        "callbacks": callbacks, "generated_at": datetime(2026, 11, 23, 0, 10, 5, tzinfo=UTC),
        "timezone": "Asia/Shanghai"}
    return DailyReport(**(values | changes))


def display_width(text: str) -> int:
    return sum(2 if unicodedata.east_asian_width(c) in ("W", "F") else 1 for c in text)


def sections(text: str) -> dict[str, list[list[str]]]:
    """CSV sections by title: [header row, data rows...]; sections are separated by one empty row."""
    rows = list(csv.reader(io.StringIO(text)))
    found: dict[str, list[list[str]]] = {}
    chunk: list[list[str]] = []
    for row in [*rows, []]:
        if row:
            chunk.append(row)
            continue
        assert chunk, "two empty rows in a row"
        title, *rest = chunk
        assert len(title) == 1 and rest, f"a section needs a one-cell title row and a header row: {chunk}"
        found[title[0]] = rest
        chunk = []
    return found


class TextOf(HTMLParser):
    """The text a browser would show, and the tags it would build."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.text: list[str] = []
        self.tags: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def test_html_escapes_every_value_from_outside() -> None:
    page = render_html(sample())
    assert "<script" not in page and EVIL not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt; 张三 &amp; &quot;O&#x27;Brien&quot;" in page
    parsed = TextOf()
    parsed.feed(page)
    assert "script" not in parsed.tags
    shown = "".join(parsed.text)
    assert EVIL in shown and FORMULA in shown  # shown exactly as the network sent them
    assert page.startswith("<!DOCTYPE html>") and '<meta charset="utf-8">' in page
    assert "<link" not in page and "<img" not in page and "src=" not in page  # self-contained
    assert "接通率" in shown and "answer rate" in shown and "57.1" in shown and "值班员小王" in shown


def test_csv_is_sections_that_parse_back() -> None:
    parsed = sections(render_csv(sample()))
    assert list(parsed) == ["报告 report", "每日指标 daily KPIs", "坐席接听 answered by agent", "违规记录 violations",
                            "线路状况 line health", "待回拨 callbacks due"]
    meta = {row[2]: row[1] for row in parsed["报告 report"][1:]}
    assert meta == {"day": "2026-11-22", "timezone": "Asia/Shanghai", "generated_at": "2026-11-23 08:10:05"}
    header, *kpi = parsed["每日指标 daily KPIs"]
    assert header == ["指标 item", "数值 value", "字段 field"]
    figures = {row[2]: row[1] for row in kpi}
    assert figures["calls"] == "7" and figures["answer_rate_pct"] == "57.1" and figures["sheet_rate_pct"] == "28.6"
    assert ["接通率 answer rate %", "57.1", "answer_rate_pct"] in kpi
    header, *agents = parsed["坐席接听 answered by agent"]
    assert header[:4] == ["坐席 agent", "客服手机 duty mobile", "保管人 holder", "接听数 answered"]
    assert agents == [["agent101", "否", "", "2", "5.5", "0", "210.0", "105.0", "1"],
                      ["13900139000", "是", "值班员小王", "1", "", "0", "30.0", "30.0", "1"]]
    header, *violations = parsed["违规记录 violations"]
    assert violations[0][:5] == ["2026-11-22 10:15:15", "超过三响未接", "ring_limit", "13800138001", EVIL]
    header, *callbacks = parsed["待回拨 callbacks due"]
    assert callbacks[0][1] == "+86 135-0013-5000"  # a number stays a number
    assert callbacks[0][2] == "'" + FORMULA  # a formula does not run in a spreadsheet
    assert callbacks[0][5] == "16:09:40" and callbacks[1][5] == "2天 08:10:20"
    skewed = sections(render_csv(sample(callbacks=({"waiting": timedelta(seconds=-5)},))))  # clocks disagree
    assert skewed["待回拨 callbacks due"][1][5] == "-00:00:05"


def test_empty_sections_keep_their_header_row() -> None:
    parsed = sections(render_csv(sample(agents=(), violations=(), callbacks=(), line_health=None)))
    assert parsed["坐席接听 answered by agent"][0][0] == "坐席 agent" and len(parsed["坐席接听 answered by agent"]) == 1
    assert len(parsed["待回拨 callbacks due"]) == 1 and len(parsed["线路状况 line health"]) == 1


def test_text_has_the_figures_aligned_and_nothing_that_drives_a_terminal() -> None:
    text = render_text(sample())
    lines = text.splitlines()
    assert lines[0] == "400热线日报 hotline daily report  2026-11-22"
    assert "生成时间 generated at 2026-11-23 08:10:05" in lines[1]
    kpi = lines[lines.index("== 每日指标 daily KPIs ==") + 1:lines.index("== 坐席接听 answered by agent ==") - 1]
    assert len(kpi) == len(KPI_COLUMNS) == 19
    assert len({display_width(line) for line in kpi}) == 1  # numbers right-aligned in one column
    assert any(line.startswith("  接通率 answer rate %") and line.endswith(" 57.1") for line in kpi)
    assert any("值班员小王" in line and "30.0" in line for line in lines)
    table = lines[lines.index("== 坐席接听 answered by agent ==") + 1:][:5]
    assert table[0].split()[:3] == ["坐席", "客服手机", "保管人"] and set(table[2].replace(" ", "")) == {"-"}
    rule = table[2]
    assert all(display_width(line) <= display_width(rule) for line in table)
    assert display_width(table[3]) == display_width(table[4]) == display_width(rule)  # last column right-aligned
    assert "\x1b" not in text and "\u202e" not in text and "bad?[2Jterminal?" in text
    assert "<script>alert(1)</script> 张三 & \"O'Bri…" in text  # no escaping, long cells cut to 40 columns
    health = lines[lines.index("== 线路状况 line health ==  (生成报告时 as of the report's generation)") + 1:][:13]
    assert "  测拨到达(毫秒) dial to arrival, ms        8" in health  # left-aligned: not all numbers


def test_a_day_without_calls_reads_as_zeros_and_dashes() -> None:
    report = sample(kpi=report_module._no_calls(DAY), agents=(), violations=())
    text = render_text(report)
    assert any(line.startswith("  来电总数 calls") and line.endswith(" 0") for line in text.splitlines())
    assert any(line.startswith("  接通率 answer rate %") and line.endswith(" -") for line in text.splitlines())
    assert "(无 none)" in text


def smtp(**values: Any) -> SmtpSettings:
    return SmtpSettings.model_validate({"host": "mail.example.com", "port": 587, "sender": "hotline@example.com"}
                                       | values)


def test_mail_has_text_and_html_alternatives_and_the_csv_with_a_bom() -> None:
    report = sample()
    message = compose_email(report, smtp(), ["boss@example.com", "ops@example.com"], "html")
    assert message["Subject"] == "400热线日报 2026-11-22 / hotline daily report"
    assert message["From"] == "hotline@example.com" and message["To"] == "boss@example.com, ops@example.com"
    assert message.get_content_type() == "multipart/mixed"
    alternative, attachment = message.iter_parts()
    assert isinstance(alternative, EmailMessage) and isinstance(attachment, EmailMessage)
    assert alternative.get_content_type() == "multipart/alternative"
    plain, page = alternative.iter_parts()
    assert isinstance(plain, EmailMessage) and isinstance(page, EmailMessage)
    assert plain.get_content_type() == "text/plain" and plain.get_content() == render_text(report)
    assert page.get_content_type() == "text/html" and page.get_content() == render_html(report)
    assert attachment.get_content_type() == "text/csv" and attachment.get_filename() == "hotline-report-2026-11-22.csv"
    assert attachment.get_content_disposition() == "attachment"
    raw = attachment.get_payload(decode=True)
    assert isinstance(raw, bytes) and raw.startswith(b"\xef\xbb\xbf")
    assert raw.decode("utf-8-sig") == render_csv(report)
    assert "Asia/Shanghai" not in str(message["Date"]) and message["Message-ID"].endswith("@example.com>")


def test_mail_in_text_format_has_no_html() -> None:
    message = compose_email(sample(), smtp(), ["boss@example.com"], "text")
    types = [part.get_content_type() for part in message.walk()]
    assert types == ["multipart/mixed", "text/plain", "text/csv"]


def test_default_day_is_yesterday_in_local_time() -> None:
    assert default_day(datetime(2026, 11, 22, 16, 30, tzinfo=UTC), SH) == date(2026, 11, 22)  # 00:30 on the 23rd
    assert default_day(datetime(2026, 11, 22, 15, 59, tzinfo=UTC), SH) == date(2026, 11, 21)  # 23:59 on the 22nd
    with pytest.raises(ValueError, match="aware"):
        default_day(datetime(2026, 11, 22, 16, 30), SH)


class FakeSmtp:
    """Stands in for smtplib.SMTP / SMTP_SSL; records what the sender did."""

    calls: ClassVar[list[tuple[str, Any]]] = []
    fail_login: ClassVar[bool] = False

    def __init__(self, host: str, port: int, timeout: float, context: Any = None) -> None:
        self.calls.append(("connect", (type(self).__name__, host, port, timeout, context is not None)))

    def __enter__(self) -> FakeSmtp:
        return self

    def __exit__(self, *exc: object) -> None:
        self.calls.append(("quit", None))

    def starttls(self, context: Any) -> None:
        self.calls.append(("starttls", context is not None))

    def login(self, user: str, password: str) -> None:
        self.calls.append(("login", user))
        if self.fail_login:
            raise smtplib.SMTPAuthenticationError(535, f"5.7.8 bad credentials for {user} / {password}".encode())

    def send_message(self, message: EmailMessage) -> dict[str, Any]:
        self.calls.append(("send", message["To"]))
        return {}


class FakeSmtpSsl(FakeSmtp):
    pass


@pytest.fixture
def fake_smtp(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, Any]]:
    calls: list[tuple[str, Any]] = []
    monkeypatch.setattr(FakeSmtp, "calls", calls)
    monkeypatch.setattr(FakeSmtp, "fail_login", False)
    monkeypatch.setattr(smtplib, "SMTP", FakeSmtp)
    monkeypatch.setattr(smtplib, "SMTP_SSL", FakeSmtpSsl)
    return calls


async def test_starttls_then_login_then_send(fake_smtp: list[tuple[str, Any]]) -> None:
    settings = smtp(security="starttls", username="reports", password="s3cret-pw")
    await send_email(settings, compose_email(sample(), settings, ["boss@example.com"], "html"))
    assert fake_smtp == [("connect", ("FakeSmtp", "mail.example.com", 587, 30.0, False)), ("starttls", True),
                         ("login", "reports"), ("send", "boss@example.com"), ("quit", None)]


async def test_implicit_tls_and_no_login_without_a_username(fake_smtp: list[tuple[str, Any]]) -> None:
    settings = smtp(security="tls", port=465)
    await send_email(settings, compose_email(sample(), settings, ["boss@example.com"], "text"))
    assert [name for name, _ in fake_smtp] == ["connect", "send", "quit"]
    assert fake_smtp[0][1][:3] == ("FakeSmtpSsl", "mail.example.com", 465) and fake_smtp[0][1][4] is True


async def test_a_failure_names_the_server_but_never_the_password(fake_smtp: list[tuple[str, Any]]) -> None:
    FakeSmtp.fail_login = True
    settings = smtp(security="starttls", username="reports", password="s3cret-pw")
    with pytest.raises(ReportError) as caught:
        await send_email(settings, compose_email(sample(), settings, ["boss@example.com"], "html"))
    assert "mail.example.com:587" in str(caught.value) and "535" in str(caught.value)
    assert "s3cret-pw" not in str(caught.value) and caught.value.__cause__ is None


async def test_the_scheduler_waits_for_daily_at_and_does_nothing_without_recipients() -> None:
    async def no_database() -> asyncpg.Connection:
        raise AssertionError("must not touch the database")

    report = ReportSettings(recipients=["boss@example.com"], daily_at="08:10")
    early = Clock(datetime(2026, 11, 23, 8, 9, 0, tzinfo=SH))
    scheduler = DailyReportScheduler(report, smtp(), SH, early, no_database, check_interval=0.01)
    assert await scheduler.check() is None and scheduler.last_sent_day is None and scheduler.last_error is None
    late = Clock(datetime(2026, 11, 23, 9, 0, tzinfo=SH))
    idle = DailyReportScheduler(ReportSettings(), smtp(), SH, late, no_database, check_interval=0.01)
    await idle.run()  # returns at once: nobody to mail
    assert await idle.check() is None


async def test_scheduler_survives_an_unexpected_error_and_reports_it() -> None:
    attempts: list[int] = []

    async def broken_database() -> asyncpg.Connection:
        attempts.append(1)
        raise RuntimeError("a bug in the report")

    report = ReportSettings(recipients=["boss@example.com"], daily_at="08:10")
    late = Clock(datetime(2026, 11, 23, 9, 0, tzinfo=SH))
    scheduler = DailyReportScheduler(report, smtp(), SH, late, broken_database, check_interval=0.01)
    task = asyncio.create_task(scheduler.run())
    while len(attempts) < 3:  # it keeps checking: the daemon's other tasks are not taken down
        await asyncio.sleep(0.01)
    scheduler.stop()
    await task
    assert scheduler.last_error == "RuntimeError: a bug in the report"
