"""The `pbx-bridge` command line: run, migrate, check-config."""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from datetime import datetime, timedelta
from pathlib import Path

import asyncpg
import structlog

from pbx_bridge import __version__
from pbx_bridge.config import ConfigError, Settings, config_path, load_settings
from pbx_bridge.logs import configure_logging
from pbx_bridge.storage.migrations import MigrationError, migrate, sql_dir

EXIT_CONFIG = 2
EXIT_FAILURE = 1


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", metavar="PATH",
                        help="configuration file (default: $PBX_BRIDGE_CONFIG or /etc/pbx-bridge/pbx-bridge.toml)")
    parser = argparse.ArgumentParser(prog="pbx-bridge", parents=[common],
                                     description="400 hotline rules on Asterisk, every call recorded in PostgreSQL.")
    parser.add_argument("--version", action="version", version=f"pbx-bridge {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    commands.add_parser("run", parents=[common], help="run the daemon in the foreground")
    commands.add_parser("migrate", parents=[common], help="apply the SQL migrations (idempotent)")
    commands.add_parser("check-config", parents=[common], help="validate the configuration and print it")
    commands.add_parser("probe", parents=[common],
                        help="ask the running daemon for a line probe, wait, exit 0 only if the line is healthy")
    dialplan = commands.add_parser("dialplan", parents=[common],
                                   help="write extensions_generated.conf (the dialplan's static fallback)")
    dialplan.add_argument("--output", metavar="FILE", help="write here instead of standard output")
    return parser


def _check_config(settings: Settings) -> None:
    now = datetime.now(settings.zone)
    print("configuration OK")
    print(f"  time zone       {settings.timezone} (local time now {now:%Y-%m-%d %H:%M %a})")
    print(f"  AMI             {settings.ami.username}@{settings.ami.host}:{settings.ami.port}")
    print(f"  hotline numbers {', '.join(settings.hotline.numbers)} on trunk {settings.hotline.trunk}")
    limit = settings.ring.max_rings * settings.ring.period_seconds
    print(f"  ring limit      {settings.ring.max_rings} rings x {settings.ring.period_seconds:g} s "
          f"(answered within {limit:g} s)")
    schedule = settings.hours.schedule(settings.zone)
    print(f"  today           {schedule.day(now.date()).describe()}")
    state = "OPEN (agents ring)" if schedule.is_open(now) else "CLOSED (after hours)"
    boundary = schedule.next_boundary(now)
    until = f", until {boundary:%Y-%m-%d %H:%M %a}" if boundary else ""
    print(f"  now             {state}{until}")
    print("  next days       " + "\n                  ".join(
        schedule.day(now.date() + timedelta(days=d)).describe() for d in range(1, 4)))
    if not schedule.day(now.date()).calendar_known:
        print(f"  WARNING         the holiday calendar has no data for {now.year}: weekly hours only "
              "(upgrade the chinesecalendar package)")
    print(f"  ops API         {settings.api.listen}")
    print(f"  spool           {settings.database.spool_path}")


EXIT_PROBE_FAILED = 1
EXIT_DAEMON_UNREACHABLE = 3


async def _probe(settings: Settings) -> int:
    """POST /probes to the running daemon, poll until it finishes, print each attempt."""
    import aiohttp

    token = settings.api.resolved_token()
    if token is None:
        print("pbx-bridge probe: no [api] token is configured, so the daemon refuses probe requests",
              file=sys.stderr)
        return EXIT_CONFIG
    host, port = settings.api.host_port
    base = f"http://{host}:{port}"
    headers = {"Authorization": f"Bearer {token.get_secret_value()}"}
    deadline = time.monotonic() + 4 * settings.probe.timeout_seconds + 30
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10), headers=headers) as http:
            async with http.post(f"{base}/probes") as response:
                body = await response.json()
                if response.status != 202:
                    print(f"pbx-bridge probe: refused ({response.status}): {body.get('error')}", file=sys.stderr)
                    return EXIT_PROBE_FAILED
            print(f"probe {body['id']} {'started' if body['started'] else 'already running'} "
                  f"({body['trigger']}); waiting", flush=True)
            while body["status"] == "running" and time.monotonic() < deadline:
                await asyncio.sleep(0.5)
                async with http.get(f"{base}/probes/{body['id']}") as response:
                    body = await response.json()
    except (aiohttp.ClientError, TimeoutError) as exc:
        print(f"pbx-bridge probe: the daemon's API at {base} is unreachable: {exc}", file=sys.stderr)
        return EXIT_DAEMON_UNREACHABLE
    for attempt in body["attempts"]:
        delay = f", {attempt['delay_ms']} ms dial to arrival" if attempt["delay_ms"] is not None else ""
        reason = f" ({attempt['reason']})" if attempt["reason"] else ""
        print(f"  attempt {attempt['attempt']}: {attempt['outcome']}{delay}{reason}")
    print(f"line {'healthy' if body['status'] == 'ok' else 'NOT healthy'}: {body['status']}")
    return 0 if body["status"] == "ok" else EXIT_PROBE_FAILED


def _dialplan(settings: Settings, output: str | None, source: str) -> None:
    from pbx_bridge.dialplan import render

    text = render(settings, source)
    if output is None:
        sys.stdout.write(text)
        return
    target = Path(output)
    partial = target.with_name(target.name + ".partial")
    partial.write_text(text, encoding="utf-8")
    partial.replace(target)  # Asterisk never reads a half-written file
    print(f"wrote {target}")


async def _migrate(settings: Settings) -> None:
    conn = await asyncpg.connect(settings.database.dsn.get_secret_value(), timeout=10)
    try:
        applied = await migrate(conn, sql_dir())
    finally:
        await conn.close()
    print("migrations applied: " + ", ".join(applied) if applied else "database schema is up to date")


def main(argv: list[str] | None = None) -> None:
    """Entry point of the `pbx-bridge` console script."""
    args = _parser().parse_args(argv)
    try:
        settings = load_settings(config_path(args.config))
    except ConfigError as exc:
        print(f"pbx-bridge: configuration error: {exc}", file=sys.stderr)
        raise SystemExit(EXIT_CONFIG) from None
    configure_logging(settings.log.level, settings.log.format)
    log = structlog.get_logger("pbx_bridge")
    try:
        if args.command == "check-config":
            _check_config(settings)
        elif args.command == "probe":
            raise SystemExit(asyncio.run(_probe(settings)))
        elif args.command == "dialplan":
            _dialplan(settings, args.output, str(config_path(args.config)))
        elif args.command == "migrate":
            asyncio.run(_migrate(settings))
        elif args.command == "run":
            _run(settings, log)
    except (MigrationError, OSError, asyncpg.PostgresError) as exc:
        print(f"pbx-bridge {args.command}: {exc}", file=sys.stderr)
        raise SystemExit(EXIT_FAILURE) from None


def _run(settings: Settings, log: structlog.typing.FilteringBoundLogger) -> None:
    from pbx_bridge.daemon import run_daemon

    try:
        asyncio.run(run_daemon(settings))
    except* Exception as group:  # a daemon task failed: log every failure, exit non-zero
        for exc in group.exceptions:
            log.error("pbx_bridge_failed", error=repr(exc), exc_info=exc)
        raise SystemExit(EXIT_FAILURE) from None
