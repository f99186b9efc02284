"""The daily report's charts as PNG images (matplotlib, Agg), with Chinese labels in a real CJK font."""

from __future__ import annotations

import functools
import io
import math
from collections.abc import Iterator
from dataclasses import dataclass
from decimal import Decimal
from typing import TYPE_CHECKING, Any

import structlog

from pbx_bridge.report.model import DailyReport

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

log = structlog.get_logger("pbx_bridge.report")

# The first of these that is installed draws the labels (Debian: fonts-noto-cjk). Without any,
# Chinese would come out as boxes: the charts are then left out, and that is logged.
CJK_FAMILIES = ("Noto Sans CJK SC", "Noto Sans CJK JP", "Source Han Sans SC", "WenQuanYi Zen Hei",
                "WenQuanYi Micro Hei", "Microsoft YaHei", "PingFang SC", "SimHei")
ANSWERED, UNANSWERED, LIMIT, RATE, WITHIN = "#2f9e6f", "#e5383b", "#c0392b", "#3b82c4", "#e0a100"
WIDTH_PX, HEIGHT_PX, DPI = 760, 300, 150  # drawn at DPI, shown at WIDTH_PX x HEIGHT_PX (sharp on any screen)
RING_BIN_SECONDS = 1.0


@dataclass(frozen=True)
class Chart:
    """One chart: its name (the mail's Content-ID is <name@pbx-bridge>), titles, the PNG and a text alternative."""

    name: str
    zh: str
    en: str
    png: bytes
    alt: str

    @property
    def content_id(self) -> str:
        return f"{self.name}@pbx-bridge"


@functools.cache
def cjk_family() -> str | None:
    """The installed CJK font family the charts use; None if there is none."""
    from matplotlib import font_manager

    installed = {font.name for font in font_manager.fontManager.ttflist}
    return next((family for family in CJK_FAMILIES if family in installed), None)


def _number(value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, Decimal | int | float):
        return float(value)
    return None


def _figure() -> tuple[Figure, Axes]:
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    figure = Figure(figsize=(WIDTH_PX / 100, HEIGHT_PX / 100), dpi=100, layout="constrained")
    axes = figure.add_subplot()
    axes.spines[["top", "right"]].set_visible(False)
    axes.grid(axis="y", color="#dddddd", linewidth=0.6)
    axes.set_axisbelow(True)
    axes.yaxis.set_major_locator(MaxNLocator(integer=True))  # counts of calls
    return figure, axes


def _png(figure: Figure) -> bytes:
    out = io.BytesIO()
    figure.savefig(out, format="png", dpi=DPI, facecolor="white", metadata={"Software": None})
    return out.getvalue()


def hourly_chart(report: DailyReport) -> Chart | None:
    """Calls per local hour, answered and not answered stacked."""
    if not report.hourly:
        return None
    by_hour = {int(row["hour"]): row for row in report.hourly}
    first = min(8, *by_hour)
    last = max(18, *by_hour)
    hours = list(range(first, last + 1))
    answered = [int(by_hour[h]["answered"]) if h in by_hour else 0 for h in hours]
    unanswered = [int(by_hour[h]["calls"]) - int(by_hour[h]["answered"]) if h in by_hour else 0 for h in hours]
    figure, axes = _figure()
    axes.bar(hours, answered, color=ANSWERED, label="接通 answered", width=0.75)
    axes.bar(hours, unanswered, bottom=answered, color=UNANSWERED, label="未接通 not answered", width=0.75)
    axes.set_xticks(hours, [f"{h}" for h in hours])
    axes.set_xlabel("小时 hour")
    axes.set_ylabel("来电 calls")
    axes.set_title("每小时来电 calls per hour", loc="left", fontsize=11)
    axes.legend(frameon=False, fontsize=9, loc="upper right")
    total = sum(answered) + sum(unanswered)
    return Chart("hourly", "每小时来电", "calls per hour", _png(figure),
                 f"每小时来电:共 {total} 个,接通 {sum(answered)} 个 / "
                 f"calls per hour: {total}, {sum(answered)} answered")


def ring_chart(report: DailyReport) -> Chart | None:
    """How long calls rang, in seconds, with the ring limit marked."""
    if not report.ring_seconds:
        return None
    limit = report.ring_limit_seconds
    top = max(limit * 2, math.ceil(max(report.ring_seconds)))
    edges = [i * RING_BIN_SECONDS for i in range(int(top / RING_BIN_SECONDS) + 2)]
    figure, axes = _figure()
    within = [s for s in report.ring_seconds if s < limit]
    over = [s for s in report.ring_seconds if s >= limit]
    axes.hist([within, over], bins=edges, stacked=True, color=[ANSWERED, UNANSWERED],
              label=["三响内 within", "超过三响 over the limit"])
    axes.axvline(limit, color=LIMIT, linestyle="--", linewidth=1.5)
    axes.annotate(f"三响 {limit:g} 秒 ring limit", xy=(limit, 1), xycoords=("data", "axes fraction"),
                  xytext=(4, -12), textcoords="offset points", color=LIMIT, fontsize=9)
    axes.set_xlabel("振铃时长(秒) ring time, s")
    axes.set_ylabel("来电 calls")
    axes.set_title("振铃时长分布 ring time", loc="left", fontsize=11)
    axes.legend(frameon=False, fontsize=9, loc="upper right")
    return Chart("ring-time", "振铃时长分布", "ring time", _png(figure),
                 f"振铃时长分布:{len(within)} 个三响内,{len(over)} 个超过 {limit:g} 秒 / "
                 f"ring time: {len(within)} within, {len(over)} over {limit:g} s")


def week_chart(report: DailyReport) -> Chart | None:
    """The last 7 days' answer rate and share answered within the ring limit."""
    days = [row for row in report.week if row.get("day") is not None]
    if not days:
        return None
    labels = [f"{row['day']:%m-%d}" for row in days]
    answer = [_number(row.get("answer_rate_pct")) for row in days]
    within = [_number(row.get("within_ring_limit_pct")) for row in days]
    figure, axes = _figure()
    positions = list(range(len(days)))
    axes.plot(positions, [math.nan if v is None else v for v in answer], marker="o", color=RATE,
              label="接通率 answer rate")
    axes.plot(positions, [math.nan if v is None else v for v in within], marker="s", color=WITHIN,
              label="三声内接听率 within 3 rings")
    axes.set_xticks(positions, labels)
    axes.set_ylim(0, 105)
    axes.set_ylabel("%")
    axes.set_title("近7天 last 7 days", loc="left", fontsize=11)
    axes.legend(frameon=False, fontsize=9, loc="lower left")
    last_answer, last_within = answer[-1], within[-1]
    return Chart("week", "近7天接通率与三声内接听率", "last 7 days", _png(figure),
                 f"近7天接通率,最近一天 {last_answer if last_answer is not None else '-'}%;三声内接听率 "
                 f"{last_within if last_within is not None else '-'}% / last 7 days' rates")


def render_charts(report: DailyReport) -> list[Chart]:
    """Every chart the report has data for; none if no CJK font is installed (logged)."""
    family = cjk_family()
    if family is None:
        log.warning("report_charts_off", reason="no CJK font installed: Chinese labels would be boxes",
                     fix="install fonts-noto-cjk")
        return []
    from matplotlib import rc_context

    with rc_context({"font.family": [family, "DejaVu Sans"], "font.size": 9, "axes.unicode_minus": False,
                     "svg.fonttype": "path"}):
        return [chart for chart in _each(report) if chart is not None]


def _each(report: DailyReport) -> Iterator[Chart | None]:
    yield hourly_chart(report)
    yield ring_chart(report)
    yield week_chart(report)
