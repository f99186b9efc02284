"""Mailing the daily report: the message (text, HTML with its charts, the CSV attached) and SMTP."""

from __future__ import annotations

import asyncio
import smtplib
import ssl
from datetime import UTC, date
from email.message import EmailMessage
from email.utils import format_datetime, make_msgid

import structlog

from pbx_bridge.config import SmtpSettings
from pbx_bridge.report.charts import render_charts
from pbx_bridge.report.model import DailyReport, ReportError, subject
from pbx_bridge.report.render import render_csv, render_html, render_text

log = structlog.get_logger("pbx_bridge.report")

# ---------------------------------------------------------------------------------------------
# Email


def attachment_name(day: date) -> str:
    """The CSV attachment's file name."""
    return f"hotline-report-{day.isoformat()}.csv"


def compose_email(report: DailyReport, smtp: SmtpSettings, recipients: list[str], main_format: str) -> EmailMessage:
    """The report mail: text (and HTML when `main_format` is "html", its charts as related PNG parts
    that the HTML shows by Content-ID) alternatives, the CSV attached. CPU-bound: the charts are drawn here."""
    if not recipients:
        raise ValueError("compose_email needs at least one recipient")
    message = EmailMessage()
    message["Subject"] = subject(report)
    message["From"] = smtp.sender
    message["To"] = ", ".join(recipients)
    message["Date"] = format_datetime(report.generated_at.astimezone(UTC))
    message["Message-ID"] = make_msgid("pbx-bridge-report", domain=smtp.sender.rpartition("@")[2])
    message.set_content(render_text(report), subtype="plain", charset="utf-8", cte="base64")
    if main_format == "html":
        charts = render_charts(report)
        message.add_alternative(render_html(report, charts, cid=True), subtype="html", charset="utf-8",
                                cte="base64")
        page = message.get_body(("html",))
        assert isinstance(page, EmailMessage)
        for chart in charts:
            page.add_related(chart.png, maintype="image", subtype="png", cid=f"<{chart.content_id}>",
                             filename=f"{chart.name}.png", disposition="inline")
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
