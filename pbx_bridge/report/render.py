"""The daily report as text, CSV or HTML (every value from outside escaped)."""

from __future__ import annotations

import base64
import csv
import html
import io
import re
import unicodedata
from collections.abc import Sequence
from datetime import tzinfo
from zoneinfo import ZoneInfo

from pbx_bridge.report.charts import HEIGHT_PX, WIDTH_PX, Chart, render_charts
from pbx_bridge.report.model import (
    TITLE_EN,
    TITLE_ZH,
    Column,
    DailyReport,
    Row,
    Section,
    format_value,
    sections,
    subject,
)

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
    value = format_value(row.get(column.key), zone)
    return "-" if value is None else _truncate(_clean(value), TEXT_CELL_MAX)


def render_text(report: DailyReport) -> str:
    """The report as aligned plain text, for a terminal or a plain-text mail."""
    zone = ZoneInfo(report.timezone)
    parts = sections(report)
    generated = report.generated_at.astimezone(zone)
    lines = [f"{TITLE_ZH} {TITLE_EN}  {report.day.isoformat()}",
             (f"站点 PBX {report.pbx} · " if report.pbx else "") + f"时区 time zone {report.timezone} · "
             f"生成时间 generated at {generated:%Y-%m-%d %H:%M:%S}"]
    for section in parts:
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


def _text_table(section: Section, zone: tzinfo) -> list[str]:
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
    value = format_value(row.get(column.key), zone)
    if value is None:
        return ""
    if value[:1] in ("=", "+", "-", "@", "\t", "\r") and not _PLAIN_NUMBER.match(value):
        return "'" + value  # a spreadsheet would otherwise run it as a formula
    return value


def render_csv(report: DailyReport) -> str:
    """The report as CSV sections, RFC 4180, one table after another.

    Each section is a title row (one cell, e.g. "坐席接听 answered by agent"), a header row, its data
    rows (none if empty), and one empty row before the next section. The first section, "报告 report",
    names the day, the time zone and when it was made. Numbers carry no unit (the header names it);
    missing values are empty cells; a text cell a spreadsheet would run as a formula (it starts with
    = + - @ and is not a plain number) gets a leading apostrophe. Mailed as an attachment, the CSV is
    UTF-8 with a BOM so that Excel shows the Chinese.
    """
    zone = ZoneInfo(report.timezone)
    out = io.StringIO()
    writer = csv.writer(out)
    for index, section in enumerate(sections(report)):
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
    value = format_value(row.get(column.key), zone)
    align = "text-align:right;" if column.kind in ("count", "number") else ""
    return f'<td style="{align}{_TD}">{"–" if value is None else _e(value)}</td>'


def _charts_html(charts: Sequence[Chart], cid: bool) -> str:
    """The charts as images: inline (data: URLs) for a file, or `cid:` references to the mail's parts."""
    if not charts:
        return ""
    images = []
    for chart in charts:
        source = f"cid:{chart.content_id}" if cid else "data:image/png;base64," + base64.b64encode(chart.png).decode()
        images.append(f'<img src="{_e(source)}" alt="{_e(chart.alt)}" width="{WIDTH_PX}" height="{HEIGHT_PX}" '
                      f'style="display:block;max-width:100%;height:auto;margin:0 0 8px 0;border:1px solid #eee">')
    return (f'<h2 style="font-size:16px;margin:12px 0 4px 0">图表 <span style="{_EN};font-size:13px">charts</span>'
            f'</h2>\n<div class="charts">{"".join(images)}</div>\n')


def render_html(report: DailyReport, charts: Sequence[Chart] | None = None, *, cid: bool = False) -> str:
    """The report as one self-contained HTML page (inline styles; every value escaped), its charts
    first (`charts`: as rendered already; None: rendered here), as data: images, or with `cid` as
    references to the mail's related parts."""
    charts = render_charts(report) if charts is None else charts
    zone = ZoneInfo(report.timezone)
    generated = report.generated_at.astimezone(zone)
    title = _e(subject(report))
    parts = [
        '<!DOCTYPE html>\n<html lang="zh-CN"><head><meta charset="utf-8">'
        f"<title>{title}</title></head>\n"
        '<body style="font-family:-apple-system,\'Segoe UI\',\'PingFang SC\',\'Microsoft YaHei\',sans-serif;'
        'color:#222;margin:16px">\n',
        f'<h1 style="font-size:20px;margin:0 0 4px 0">{_e(TITLE_ZH)} <span style="{_EN};font-size:14px">'
        f"{_e(TITLE_EN)}</span> {_e(report.day.isoformat())}</h1>\n",
        '<p style="color:#555;font-size:12px;margin:0 0 12px 0">'
        + (f"站点 PBX {_e(report.pbx)} · " if report.pbx else "") + f'时区 time zone {_e(report.timezone)} · '
        f"生成时间 generated at {_e(f'{generated:%Y-%m-%d %H:%M:%S}')}</p>\n",
    ]
    parts.append(_charts_html(charts, cid))
    for section in sections(report):
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
