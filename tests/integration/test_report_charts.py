"""The daily report's charts: from the views to PNG, drawn in Chromium with Chinese in a CJK font, and in the mail."""

from __future__ import annotations

import asyncio
import os
import random
import warnings
from collections.abc import Iterator
from datetime import UTC, date, datetime
from email.message import EmailMessage
from pathlib import Path

import asyncpg
import pytest

from pbx_bridge.config import SmtpSettings
from pbx_bridge.report import DailyReport, build_report, cjk_family, compose_email, render_charts, render_html
from tests.conftest import scratch_database
from tests.support.browser import chromium
from tests.support.env import DevEnv
from tests.support.seed import add_call, add_violation

pytestmark = pytest.mark.integration

DAY = date(2031, 5, 20)
PNG = b"\x89PNG\r\n\x1a\n"


async def seed(conn: asyncpg.Connection) -> None:
    """A week of calls; on DAY, a working day's traffic with some long rings and missed calls."""
    rng = random.Random(20310520)
    for back in range(7):
        day = date(2031, 5, 20 - back)
        for index in range(rng.randint(12, 30) if back else 60):
            hour = rng.choice([9, 9, 10, 10, 10, 11, 11, 13, 14, 14, 15, 15, 16, 17])
            started = f"{day.isoformat()} {hour:02d}:{rng.randint(0, 59):02d}:{rng.randint(0, 59):02d}"
            ring = round(rng.triangular(1.0, 24.0, 5.0), 1)
            caller = f"139{rng.randint(0, 99999999):08d}"
            linkedid = f"chart-{day:%m%d}-{index}"
            if ring > 20 or rng.random() < 0.06:
                await add_call(conn, linkedid, started, caller, "abandoned", ring=ring, within=ring < 15 and None)
            else:
                await add_call(conn, linkedid, started, caller, "answered", ring=ring, within=ring < 15,
                               answered_by=rng.choice(["agent101", "agent102"]), talk=rng.uniform(30, 400),
                               wait=ring + 1)
            if ring >= 15:
                await add_violation(conn, "ring_limit", linkedid, started)


@pytest.fixture(scope="module")
def report(devenv: DevEnv) -> Iterator[DailyReport]:
    with scratch_database(devenv, "charts", seed) as dsn:
        async def build() -> DailyReport:
            conn = await asyncpg.connect(dsn)
            try:
                return await build_report(conn, DAY, generated_at=datetime(2031, 5, 21, 0, 10, tzinfo=UTC),
                                          ring_limit_seconds=15.0)  # China: 3 rings of 5 s
            finally:
                await conn.close()
        yield asyncio.run(build())


def shots(tmp_path: Path) -> Path:
    return Path(os.environ.get("PBX_BRIDGE_SCREENSHOTS") or tmp_path)


def test_the_report_reads_the_chart_data_from_the_views(report: DailyReport) -> None:
    assert sum(int(r["calls"]) for r in report.hourly) == 60 == report.kpi["calls"]
    assert len(report.ring_seconds) == 60 and any(s >= 15 for s in report.ring_seconds)
    assert report.ring_limit_seconds == 15.0  # the chart's line: [ring] period_seconds x max_rings
    assert [r["day"] for r in report.week] == [date(2031, 5, d) for d in range(14, 21)]


def test_charts_are_pngs_with_every_chinese_glyph_in_a_cjk_font(report: DailyReport) -> None:
    assert cjk_family() is not None, "no CJK font: `make env` installs fonts-noto-cjk"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        charts = render_charts(report)
    missing = [str(w.message) for w in caught if "missing from font" in str(w.message)]
    assert missing == []  # a glyph the font lacks would be drawn as a box
    assert [c.name for c in charts] == ["hourly", "ring-time", "week"]
    assert all(c.png.startswith(PNG) and len(c.png) > 10_000 for c in charts)


def test_the_mail_shows_the_charts_by_content_id(report: DailyReport) -> None:
    message = compose_email(report, SmtpSettings(host="mail.example", sender="hotline@example.com"),
                            ["boss@example.com"], "html")
    page = message.get_body(("html",))
    assert isinstance(page, EmailMessage)
    html = page.get_content()
    related = [part for part in message.walk() if part.get_content_type() == "image/png"]
    assert len(related) == 3
    for part in related:
        cid = str(part["Content-ID"]).strip("<>")
        assert f'src="cid:{cid}"' in html
        payload = part.get_payload(decode=True)
        assert isinstance(payload, bytes) and payload.startswith(PNG)
    assert "data:image" not in html and "<script" not in html  # mail clients show it without JavaScript


async def test_the_html_report_renders_in_chromium_with_charts_and_chinese(report: DailyReport,
                                                                         tmp_path: Path) -> None:
    page_file = tmp_path / "report.html"
    page_file.write_text(render_html(report), encoding="utf-8")
    assert "<script" not in page_file.read_text(encoding="utf-8")
    async with chromium(width=1000, height=1800) as page:
        await page.goto(page_file.as_uri())
        images = await page.wait_for(
            "(() => { const i = [...document.images]; return i.length === 3 && i.every(x => x.complete "
            "&& x.naturalWidth > 0) && i.map(x => [x.naturalWidth, x.naturalHeight]); })()", 10)
        assert all(width >= 760 for width, _ in images)
        for selector in ("h1", "h2", "th"):
            fonts = await page.fonts_of(selector)
            assert any("CJK" in f["familyName"] for f in fonts), (selector, fonts)  # not boxes
            assert all(f["glyphCount"] > 0 for f in fonts)
        await page.screenshot(shots(tmp_path) / "report-daily.png")
