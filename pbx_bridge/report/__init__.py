"""The daily management report (seed 001): the views' figures as text, CSV or HTML with charts, mailed daily."""

from pbx_bridge.report.charts import Chart, cjk_family, render_charts
from pbx_bridge.report.mail import attachment_name, compose_email, send_email
from pbx_bridge.report.model import (
    AGENT_COLUMNS,
    CALLBACK_COLUMNS,
    KPI_COLUMNS,
    LINE_HEALTH_COLUMNS,
    VIOLATION_COLUMNS,
    Column,
    DailyReport,
    ReportError,
)
from pbx_bridge.report.queries import _no_calls, build_report, default_day
from pbx_bridge.report.render import render_csv, render_html, render_text
from pbx_bridge.report.schedule import DailyReportScheduler

__all__ = [
    "AGENT_COLUMNS", "CALLBACK_COLUMNS", "KPI_COLUMNS", "LINE_HEALTH_COLUMNS", "VIOLATION_COLUMNS", "Chart", "Column",
    "DailyReport", "DailyReportScheduler", "ReportError", "_no_calls", "attachment_name", "build_report",
    "cjk_family", "compose_email", "default_day", "render_charts", "render_csv", "render_html", "render_text",
    "send_email",
]
