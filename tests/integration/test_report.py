"""The daily report on real PostgreSQL: exact figures, the real CLI, real SMTP (aiosmtpd), the daily mailing.

A database of this module's own is seeded with known calls on Tuesday 2031-03-04 in
Asia/Shanghai (one of them a probe, one just after the local midnight), so that the sections
that show the present state (line health, every callback due) are exact too.
"""

from __future__ import annotations

import asyncio
import csv
import io
import os
import subprocess
import time
from collections.abc import AsyncIterator, Callable, Iterator
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import asyncpg
import pytest
from aiosmtpd.smtp import AuthResult, Envelope, LoginPassword, Session
from pydantic import SecretStr

from pbx_bridge.config import ReportSettings, SmtpSettings
from pbx_bridge.report import (
    DailyReportScheduler,
    ReportError,
    build_report,
    compose_email,
    render_text,
    send_email,
)
from pbx_bridge.routing import Clock
from tests.conftest import scratch_database
from tests.support.env import REPO, DevEnv
from tests.support.mail import MailServer, free_port
from tests.support.seed import add_call, add_violation, local

pytestmark = pytest.mark.integration

SH = ZoneInfo("Asia/Shanghai")
DAY = date(2031, 3, 4)
EVIL = "<script>alert(1)</script> 张三 & \"O'Brien\""
RECIPIENTS = ["boss@example.com", "ops@example.com"]
PBX_BRIDGE = REPO / ".venv" / "bin" / "pbx-bridge"


async def add_sheet(conn: asyncpg.Connection, linkedid: str, category: str, status: str) -> None:
    await conn.execute(
        """INSERT INTO call_notes (linkedid, category, summary, owner, status, created_by, updated_by, completed_at)
           VALUES ($1, $2, '询问课程安排', '张经理', $3, '组长李雪莲', '组长李雪莲',
                   CASE WHEN $3 = '已完成' THEN now() END)""", linkedid, category, status)


async def seed(conn: asyncpg.Connection) -> None:
    # Tuesday 2031-03-04 in Shanghai. The figures below are worked out by hand in the tests.
    await add_call(conn, "rpt-a", "2031-03-04 09:30:00", "13800138000", "answered", name=EVIL, ring=7.0,
                   within=True, answered_by="agent101", talk=120, stage="group")
    await add_call(conn, "rpt-b", "2031-03-04 10:15:00", "13800138001", "answered", name="李四", ring=17.0,
                   within=False, answered_by="agent102", talk=60, stage="escalation")
    await add_call(conn, "rpt-c", "2031-03-04 14:00:00", "13700137000", "abandoned", ring=6.0)
    await add_call(conn, "rpt-g", "2031-03-04 14:30:00", "13700137000", "answered", name="王五", ring=4.0,
                   within=True, answered_by="agent101", talk=90, stage="group")  # clears rpt-c's callback
    await add_call(conn, "rpt-h", "2031-03-04 16:00:00", "+86 135-0013-5000", "abandoned", ring=20.0, within=False)
    await add_call(conn, "rpt-d", "2031-03-04 20:00:00", "13900000001", "forwarded", name="赵六",
                   answered_by="13900139000", talk=30, after_hours=True, stage="mobile", holder="值班员小王")
    await add_call(conn, "rpt-e", "2031-03-04 23:59:00", "13600136000", "voicemail", after_hours=True)
    # 2031-03-05 00:01 in Shanghai is 2031-03-04 16:01 UTC: the 5th's call, not the 4th's.
    await add_call(conn, "rpt-f", "2031-03-05 00:01:00", "13500000000", "forwarded", answered_by="13900139000",
                   talk=20, after_hours=True, stage="mobile", holder="值班员小王")
    await add_call(conn, "rpt-probe", "2031-03-04 08:00:00", "02566660000", "answered", ring=0.5, within=True,
                   answered_by="pbx-bridge-probe", talk=1, probe=True)
    await add_sheet(conn, "rpt-a", "投诉", "待处理")
    await add_sheet(conn, "rpt-d", "咨询", "已完成")
    await add_violation(conn, "ring_limit", "rpt-b", "2031-03-04 10:15:15")
    await add_violation(conn, "outbound_attempt", None, "2031-03-04 11:00:00",
                        '{"digits": "013912345678", "channel": "PJSIP/agent101-00000001"}')
    await add_violation(conn, "complaint_overdue", "rpt-a", "2031-03-04 11:30:00", '{"owner": "张经理"}')
    await add_violation(conn, "ring_limit", "rpt-h", "2031-03-04 16:00:15")
    await add_violation(conn, "unanswered", "rpt-e", "2031-03-04 23:59:40")
    await add_violation(conn, "ring_limit", "rpt-probe", "2031-03-04 08:00:15")  # a probe's: never counted
    await conn.execute(
        """INSERT INTO line_probes (probe_id, attempt, trigger, number, started_at, finished_at, outcome, delay_ms)
           VALUES ('rpt-daily', 1, 'daily', '4008001234', $1, $2, 'ok', 8)""",
        local("2031-03-05 08:00:00"), local("2031-03-05 08:00:01"))


@pytest.fixture(scope="module")
def report_dsn(devenv: DevEnv) -> Iterator[str]:
    with scratch_database(devenv, "report", seed) as dsn:
        yield dsn


def as_daemon(dsn: str) -> Callable[[], Any]:
    """Connections with only the pbx_bridge role's privileges (as the daemon and the report command have)."""
    async def connect() -> asyncpg.Connection:
        conn = await asyncpg.connect(dsn)
        await conn.execute("SET ROLE pbx_bridge")
        return conn
    return connect


@pytest.fixture
async def db(report_dsn: str) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(report_dsn)
    try:
        yield conn
    finally:
        await conn.close()


# ---------------------------------------------------------------------------------------------
# A real SMTP server


@pytest.fixture
def mail() -> Iterator[MailServer]:
    with MailServer(free_port()) as server:
        yield server


def smtp_settings(port: int, **values: Any) -> SmtpSettings:
    return SmtpSettings.model_validate(
        {"host": "127.0.0.1", "port": port, "security": "none", "sender": "hotline@example.com"} | values)


def plain_text_login(port: int, password: str) -> SmtpSettings:
    """Settings that log in over plain text, as the test server speaks. A configuration cannot say
    this (security = "none" with a password is refused), so the password is added unvalidated."""
    return smtp_settings(port, username="reports").model_copy(update={"password": SecretStr(password)})


def csv_sections(text: str) -> dict[str, list[list[str]]]:
    """Title -> [header, rows...]; sections separated by one empty row."""
    found: dict[str, list[list[str]]] = {}
    chunk: list[list[str]] = []
    for row in [*csv.reader(io.StringIO(text)), []]:
        if row:
            chunk.append(row)
        else:
            found[chunk[0][0]] = chunk[1:]
            chunk = []
    return found


# ---------------------------------------------------------------------------------------------
# Figures


async def test_build_report_has_the_days_exact_figures(report_dsn: str, db: asyncpg.Connection) -> None:
    conn = await as_daemon(report_dsn)()  # the daemon's role may read all of it
    try:
        report = await build_report(conn, DAY, generated_at=local("2031-03-05 08:10:00"))
    finally:
        await conn.close()
    assert report.day == DAY and report.timezone == "Asia/Shanghai"
    # 7 customer calls on the 4th: a b c g h d e (the probe and rpt-f, at 00:01 on the 5th, are not).
    assert report.kpi == {
        "day": DAY, "calls": 7,
        "answered": 4, "answer_rate_pct": Decimal("57.1"),              # a b g d: 4/7
        "within_ring_limit_pct": Decimal("50.0"),                       # a g within; b h rang past: 2/4
        "avg_ring_seconds": Decimal("9.3"),                             # 4 7 17 at agents' phones
        "p90_ring_seconds": Decimal("17.0"),                            # observed, not interpolated
        "abandoned": 2, "missed": 1, "voicemail": 1, "unfinished": 0,   # c h; e
        "after_hours_calls": 2, "after_hours_mobile_answered": 1,       # d e; d
        "avg_talk_seconds": Decimal("75.0"),                            # (120 + 60 + 90 + 30) / 4
        "sheets": 2, "sheet_rate_pct": Decimal("28.6"),                 # a d: 2/7
        "ring_limit_violations": 2, "unanswered_violations": 1,         # b h (not the probe's); e
        "outbound_attempt_violations": 1, "complaint_overdue_violations": 1,
    }
    assert [(r["agent"], r["duty_mobile"], r["duty_holder"], r["answered"], r["avg_ring_seconds"],
             r["ring_limit_breaches"], r["talk_seconds"], r["avg_talk_seconds"], r["sheets"])
            for r in report.agents] == [
        ("agent101", False, None, 2, Decimal("5.5"), 0, Decimal("210.0"), Decimal("105.0"), 1),
        ("agent102", False, None, 1, Decimal("17.0"), 1, Decimal("60.0"), Decimal("60.0"), 0),
        ("13900139000", True, "值班员小王", 1, None, 0, Decimal("30.0"), Decimal("30.0"), 1),
    ]
    assert [(str(v["occurred"]), v["kind"], v["linkedid"], v["subject"]) for v in report.violations] == [
        ("2031-03-04 10:15:15", "ring_limit", "rpt-b", None),
        ("2031-03-04 11:00:00", "outbound_attempt", None, "013912345678"),
        ("2031-03-04 11:30:00", "complaint_overdue", "rpt-a", "张经理"),
        ("2031-03-04 16:00:15", "ring_limit", "rpt-h", None),
        ("2031-03-04 23:59:40", "unanswered", "rpt-e", None),
    ]
    assert report.violations[2]["caller_name"] == EVIL
    assert [(str(c["called_at"]), c["caller_number"], c["result"], c["due_calls_from_number"])
            for c in report.callbacks] == [("2031-03-04 16:00:00", "+86 135-0013-5000", "来电方挂断", 1),
                                           ("2031-03-04 23:59:00", "13600136000", "语音留言", 1)]
    assert report.line_health is not None
    health = report.line_health
    assert (health["state"], health["state_label"], health["evidence"], str(health["last_probe_at"]),
            health["last_probe_trigger"], health["last_probe_outcome"], health["last_probe_delay_ms"],
            str(health["last_call_at"])) == ("ok", "正常", "probe", "2031-03-05 08:00:00", "daily", "ok", 8,
                                             "2031-03-05 00:01:00")
    # The next day has its one call; a day without any is all zeros.
    next_day = await build_report(db, date(2031, 3, 5))
    assert next_day.kpi["calls"] == 1 and next_day.kpi["answered"] == 1 and next_day.kpi["answer_rate_pct"] == 100
    quiet = await build_report(db, date(2031, 3, 3))
    assert quiet.kpi["calls"] == 0 and quiet.kpi["answer_rate_pct"] is None and quiet.agents == ()
    assert quiet.violations == () and len(quiet.callbacks) == 2  # callbacks are current, whatever the day


# ---------------------------------------------------------------------------------------------
# The command line


def write_config(path: Path, dsn: str, smtp_port: int | None = None, recipients: list[str] | None = None,
                 fmt: str = "html", smtp_extra: str = "") -> Path:
    smtp = (f'[smtp]\nhost = "127.0.0.1"\nport = {smtp_port}\nsecurity = "none"\nsender = "hotline@example.com"\n'
            f"{smtp_extra}" if smtp_port is not None else "")
    report = (f'[report]\nrecipients = [{", ".join(f"{r!r}" for r in recipients)}]\nformat = "{fmt}"\n'
              if recipients else "")
    path.write_text(f'timezone = "Asia/Shanghai"\n[ami]\nusername = "pbx-bridge"\nsecret = "unused-by-report"\n'
                    f'[database]\ndsn = "{dsn}"\n[pbx]\nname = "pbx"\n[hotline]\nnumbers = ["4008001234"]\n'
                    f'[log]\nformat = "json"\n{smtp}{report}', encoding="utf-8")
    return path


def cli(config: Path, *args: str, fake_now: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONIOENCODING": "utf-8"}
    env.pop("PBX_BRIDGE_FAKE_NOW", None)
    if fake_now:
        env["PBX_BRIDGE_FAKE_NOW"] = fake_now
    return subprocess.run([str(PBX_BRIDGE), "report", "--config", str(config), *args], capture_output=True,
                          text=True, encoding="utf-8", env=env, timeout=60, check=False)


def test_cli_prints_the_csv_of_a_date(report_dsn: str, tmp_path: Path) -> None:
    config = write_config(tmp_path / "pbx-bridge.toml", report_dsn)
    done = cli(config, "--date", "2031-03-04", "--format", "csv")
    assert done.returncode == 0, done.stderr
    sections = csv_sections(done.stdout)
    assert list(sections) == ["报告 report", "每日指标 daily KPIs", "坐席接听 answered by agent", "违规记录 violations",
                              "线路状况 line health", "待回拨 callbacks due"]
    kpi = {row[2]: row[1] for row in sections["每日指标 daily KPIs"][1:]}
    assert (kpi["calls"], kpi["answered"], kpi["answer_rate_pct"], kpi["within_ring_limit_pct"],
            kpi["avg_talk_seconds"], kpi["sheet_rate_pct"]) == ("7", "4", "57.1", "50.0", "75.0", "28.6")
    assert [row[0] for row in sections["坐席接听 answered by agent"][1:]] == ["agent101", "agent102", "13900139000"]
    violations = sections["违规记录 violations"][1:]
    assert [row[2] for row in violations] == ["ring_limit", "outbound_attempt", "complaint_overdue", "ring_limit",
                                              "unanswered"]
    assert violations[2][4] == EVIL
    assert [row[7] for row in sections["待回拨 callbacks due"][1:]] == ["rpt-h", "rpt-e"]


def test_cli_defaults_to_yesterday_local_and_writes_files_atomically(report_dsn: str, tmp_path: Path) -> None:
    config = write_config(tmp_path / "pbx-bridge.toml", report_dsn)
    # 2031-03-05 00:30 in Shanghai is still the 4th in UTC: yesterday is the 3rd (no calls).
    done = cli(config, fake_now="2031-03-05T00:30:00+08:00")
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[0] == "400热线日报 hotline daily report  2031-03-04"
    done = cli(config, fake_now="2031-03-05T09:00:00+08:00")
    lines = done.stdout.splitlines()
    assert lines[0] == "400热线日报 hotline daily report  2031-03-04"
    assert any(line.startswith("  来电总数 calls ") and line.endswith(" 7") for line in lines)
    assert any(line.startswith("  接通率 answer rate % ") and line.endswith(" 57.1") for line in lines)
    target = tmp_path / "out" / "report.csv"
    target.parent.mkdir()
    target.write_text("old")
    done = cli(config, "--date", "2031-03-04", "--format", "csv", "--output", str(target))
    assert done.returncode == 0 and done.stdout == "", done.stderr
    raw = target.read_bytes()
    assert raw.startswith(b"\xef\xbb\xbf") and csv_sections(raw.decode("utf-8-sig"))["每日指标 daily KPIs"][1] == [
        "来电总数 calls", "7", "calls"]
    assert sorted(p.name for p in target.parent.iterdir()) == ["report.csv"]  # no partial file left behind
    done = cli(config, "--date", "2031-03-04", "--format", "html", "--output", str(tmp_path / "out" / "r.html"))
    page = (tmp_path / "out" / "r.html").read_text(encoding="utf-8")
    assert done.returncode == 0 and "&lt;script&gt;" in page and "<script>" not in page


@pytest.mark.parametrize(("args", "message"), [
    (["--date", "2031-02-30"], "is not a date"),
    (["--date", "20310304"], "is not a date"),
    (["--format", "pdf"], "invalid choice"),
    (["--email", "--format", "csv"], "takes no --format or --output"),
    (["--email"], "cannot mail the report: no [report] recipients are configured"),
])
def test_cli_usage_errors_exit_2(report_dsn: str, tmp_path: Path, args: list[str], message: str) -> None:
    done = cli(write_config(tmp_path / "pbx-bridge.toml", report_dsn), *args)
    assert done.returncode == 2 and message in done.stderr, done.stderr
    assert done.stdout == ""


def test_cli_database_errors_exit_1(tmp_path: Path) -> None:
    config = write_config(tmp_path / "pbx-bridge.toml", f"postgresql://postgres@127.0.0.1:{free_port()}/nothing")
    done = cli(config, "--date", "2031-03-04")
    assert done.returncode == 1 and done.stderr.startswith("pbx-bridge report: "), done.stderr


def test_cli_mails_the_report(report_dsn: str, tmp_path: Path, mail: MailServer) -> None:
    config = write_config(tmp_path / "pbx-bridge.toml", report_dsn, mail.port, RECIPIENTS)
    done = cli(config, "--date", "2031-03-04", "--email")
    assert done.returncode == 0, done.stderr
    assert done.stdout == "mailed the report of 2031-03-04 to boss@example.com, ops@example.com\n"
    [envelope] = mail.inbox.envelopes
    assert envelope.mail_from == "hotline@example.com" and envelope.rcpt_tos == RECIPIENTS
    [message] = mail.inbox.messages()
    assert message["Subject"] == "400热线日报 2031-03-04 [pbx] / hotline daily report"  # each PBX mails its own
    assert message["To"] == "boss@example.com, ops@example.com"
    plain = message.get_body(("plain",))
    page = message.get_body(("html",))
    assert plain is not None and page is not None
    assert "400热线日报 hotline daily report  2031-03-04" in plain.get_content()
    html = page.get_content()
    assert "&lt;script&gt;alert(1)&lt;/script&gt; 张三 &amp; &quot;O&#x27;Brien&quot;" in html
    assert "<script>" not in html
    assert ">57.1<" in html
    [attachment] = list(message.iter_attachments())
    assert attachment.get_filename() == "hotline-report-2031-03-04.csv"
    raw = attachment.get_payload(decode=True)
    assert isinstance(raw, bytes) and raw.startswith(b"\xef\xbb\xbf")
    sections = csv_sections(raw.decode("utf-8-sig"))
    assert {row[2]: row[1] for row in sections["每日指标 daily KPIs"][1:]}["calls"] == "7"
    assert sections["违规记录 violations"][1:][2][4] == EVIL


def test_cli_mail_failure_names_the_server_and_exits_1(report_dsn: str, tmp_path: Path) -> None:
    port = free_port()  # nothing listens there
    done = cli(write_config(tmp_path / "pbx-bridge.toml", report_dsn, port, RECIPIENTS), "--date", "2031-03-04",
               "--email")
    assert done.returncode == 1 and f"mail server 127.0.0.1:{port}" in done.stderr, done.stderr


def authenticator(server: Any, session: Session, envelope: Envelope, mechanism: str, auth_data: Any) -> AuthResult:
    ok = isinstance(auth_data, LoginPassword) and (auth_data.login, auth_data.password) == (b"reports", b"right-pw")
    return AuthResult(success=ok, handled=False)


@pytest.mark.filterwarnings("ignore:Requiring AUTH while not requiring TLS")
async def test_login_with_the_password_and_a_refusal_never_shows_it(report_dsn: str) -> None:
    with MailServer(free_port(), authenticator=authenticator, auth_required=True, auth_require_tls=False) as server:
        conn = await asyncpg.connect(report_dsn)
        try:
            report = await build_report(conn, DAY)
        finally:
            await conn.close()
        wrong = plain_text_login(server.port, "wrong-pw-1234")
        with pytest.raises(ReportError) as caught:
            await send_email(wrong, compose_email(report, wrong, RECIPIENTS, "text"))
        assert f"127.0.0.1:{server.port}" in str(caught.value) and "535" in str(caught.value)
        assert "wrong-pw-1234" not in str(caught.value)
        assert server.inbox.envelopes == []
        right = plain_text_login(server.port, "right-pw")
        await send_email(right, compose_email(report, right, RECIPIENTS, "text"))
        assert len(server.inbox.envelopes) == 1


# ---------------------------------------------------------------------------------------------
# The daemon's daily mailing


async def wait_until(condition: Callable[[], bool], seconds: float = 10.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


async def deliveries(conn: asyncpg.Connection, day: date) -> list[dict[str, Any]]:
    return [dict(r) for r in await conn.fetch("SELECT * FROM report_deliveries WHERE day = $1", day)]


async def run_briefly(scheduler: DailyReportScheduler, until: Callable[[], bool], settle: float = 0.3) -> None:
    task = asyncio.create_task(scheduler.run())
    try:
        await wait_until(until)
        await asyncio.sleep(settle)  # several more checks
    finally:
        scheduler.stop()
        async with asyncio.timeout(5):
            await task


async def test_scheduler_mails_once_per_day_and_not_again_after_a_restart(
        report_dsn: str, db: asyncpg.Connection, mail: MailServer) -> None:
    report = ReportSettings(recipients=RECIPIENTS, daily_at="08:10", format="html")
    smtp = smtp_settings(mail.port)
    clock = Clock(local("2031-03-05 08:10:05"))
    scheduler = DailyReportScheduler(report, smtp, SH, clock, as_daemon(report_dsn), check_interval=0.05)
    await run_briefly(scheduler, lambda: len(mail.inbox.envelopes) >= 1)
    assert len(mail.inbox.envelopes) == 1 and scheduler.last_sent_day == DAY and scheduler.last_error is None
    [message] = mail.inbox.messages()
    assert message["Subject"] == "400热线日报 2031-03-04 [pbx] / hotline daily report"  # each PBX mails its own
    assert mail.inbox.envelopes[0].rcpt_tos == RECIPIENTS and message.get_body(("html",)) is not None
    [row] = await deliveries(db, DAY)
    assert row["recipients"] == RECIPIENTS
    assert abs(row["sent_at"] - local("2031-03-05 08:10:05")) < timedelta(seconds=30)  # on the business clock

    restarted = DailyReportScheduler(report, smtp, SH, Clock(local("2031-03-05 11:00:00")), as_daemon(report_dsn),
                                     check_interval=0.05)
    assert await restarted.check() is None
    await run_briefly(restarted, lambda: restarted.last_sent_day == DAY)
    assert len(mail.inbox.envelopes) == 1 and len(await deliveries(db, DAY)) == 1


async def test_scheduler_retries_after_the_mail_server_was_down(report_dsn: str, db: asyncpg.Connection) -> None:
    day = date(2031, 3, 6)  # a day without calls: its own delivery row
    port = free_port()
    report = ReportSettings(recipients=["boss@example.com"], daily_at="08:10", format="text")
    # Down at 08:10, back at 15:00 the same day: mailed then.
    scheduler = DailyReportScheduler(report, smtp_settings(port), SH, Clock(local("2031-03-07 15:00:00")),
                                     as_daemon(report_dsn), check_interval=0.05)
    task = asyncio.create_task(scheduler.run())
    try:
        await wait_until(lambda: scheduler.last_error is not None)
        assert f"127.0.0.1:{port}" in (scheduler.last_error or "")
        assert await deliveries(db, day) == [] and scheduler.last_sent_day is None
        with MailServer(port) as server:
            await wait_until(lambda: len(server.inbox.envelopes) >= 1)
            await asyncio.sleep(0.3)
            assert len(server.inbox.envelopes) == 1
            [message] = server.inbox.messages()
    finally:
        scheduler.stop()
        async with asyncio.timeout(5):
            await task
    assert message["Subject"] == "400热线日报 2031-03-06 [pbx] / hotline daily report"
    assert message.get_body(("html",)) is None
    plain = message.get_body(("plain",))
    assert plain is not None and "来电总数 calls" in plain.get_content()
    assert scheduler.last_error is None and scheduler.last_sent_day == day
    [row] = await deliveries(db, day)
    assert row["recipients"] == ["boss@example.com"]


async def test_the_seeded_day_as_text(db: asyncpg.Connection) -> None:
    report = await build_report(db, DAY, generated_at=datetime(2031, 3, 5, 0, 10, tzinfo=UTC))
    text = render_text(report)
    print(text)  # pytest -s shows it
    lines = text.splitlines()
    assert lines[1] == "站点 PBX pbx · 时区 time zone Asia/Shanghai · 生成时间 generated at 2031-03-05 08:10:00"
    assert any(line.startswith("  agent102 ") and " 17.0 " in line for line in lines)


async def test_a_report_mailed_but_not_recorded_is_recorded_later_and_not_mailed_again(
        report_dsn: str, db: asyncpg.Connection, mail: MailServer) -> None:
    day = date(2031, 3, 8)
    real = as_daemon(report_dsn)
    attempts: list[int] = []

    async def flaky() -> asyncpg.Connection:
        attempts.append(1)
        if len(attempts) == 2:  # the database goes away between mailing and recording
            raise ConnectionRefusedError(111, "Connection refused")
        conn: asyncpg.Connection = await real()
        return conn

    report = ReportSettings(recipients=["boss@example.com"], daily_at="08:10", format="text")
    scheduler = DailyReportScheduler(report, smtp_settings(mail.port), SH, Clock(local("2031-03-09 09:00:00")),
                                     flaky, check_interval=0.05)
    assert await scheduler.check() == day
    assert len(mail.inbox.envelopes) == 1 and await deliveries(db, day) == []
    assert await scheduler.check() is None  # records it now, does not mail it again
    assert len(mail.inbox.envelopes) == 1 and len(await deliveries(db, day)) == 1 and len(attempts) == 3
