#!/usr/bin/env python3
"""`make run`: pbx-bridge in the foreground against the sandbox PBX, with one demo call.

Starts `pbx-bridge run`, shows its log, places a real call through the sandbox's world
instance (caller 张三客户, agent101 answers after 7 s and talks 4 s), prints the record
that lands in PostgreSQL, then keeps running until Ctrl-C, when it stops pbx-bridge, the
sandbox and PostgreSQL it started.
"""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import IO
from zoneinfo import ZoneInfo

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import asyncpg  # noqa: E402

from pbx_bridge.config import load_settings  # noqa: E402
from pbx_bridge.logs import configure_logging  # noqa: E402
from tests.support.env import DevEnv, load_devenv  # noqa: E402
from tests.support.world import IGNORE, answer, connect_world  # noqa: E402

DEMO_CALLER = "13800138000"
ZONE = ZoneInfo("Asia/Shanghai")
SHOWN = ("linkedid", "did", "caller_number", "caller_name", "started_at", "ring_started_at", "answered_at",
         "ended_at", "ring_seconds", "rings", "within_ring_limit", "answered_by", "answered_stage", "disposition",
         "after_hours", "forwarded_to", "duty_holder", "needs_call_sheet", "wait_seconds", "mobile_ring_seconds",
         "mobile_within_ring_limit", "talk_seconds", "hangup_cause", "source")


def show_log(stream: IO[str], connected: threading.Event) -> None:
    """Echo the daemon's JSON log as readable lines; note when AMI is connected."""
    for line in stream:
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            sys.stdout.write(line)
            continue
        event = entry.pop("event", "")
        stamp = str(entry.pop("timestamp", ""))[11:23]
        level = entry.pop("level", "")
        details = " ".join(f"{k}={v}" for k, v in entry.items())
        print(f"  pbx-bridge {stamp} {level:<7} {event} {details}", flush=True)
        if event == "ami_connected":
            connected.set()


async def demo_call(env: DevEnv) -> None:
    async with asyncpg.create_pool(env.dsn, min_size=1, max_size=1) as pool, connect_world(env) as world:
        since = datetime.now(UTC) - timedelta(seconds=1)
        await world.set_phone(DEMO_CALLER, "agent101", answer(7, 4))
        await world.set_phone(DEMO_CALLER, "agent102", IGNORE)
        await world.set_phone(DEMO_CALLER, env.duty_mobile, answer(3, 4))
        settings = load_settings(env.config_path)
        now = datetime.now(settings.zone)
        if settings.hours.schedule(settings.zone).is_open(now):
            expect = "business hours: agent101 answers after 7 s and talks 4 s"
        else:
            expect = f"after hours: forwarded to the duty mobile {env.duty_mobile}, answered after 3 s"
        print(f"\n>>> placing a demo call at {now:%H:%M} {ZONE.key}: {DEMO_CALLER} (张三客户) -> "
              f"{env.hotline_numbers[0]}; {expect}\n", flush=True)
        await world.call(env.hotline_numbers[0], DEMO_CALLER, "张三客户")
        for _ in range(150):
            await asyncio.sleep(0.2)
            row = await pool.fetchrow(
                "SELECT * FROM calls WHERE caller_number = $1 AND started_at >= $2 AND ended_at IS NOT NULL",
                DEMO_CALLER, since)
            if row is not None:
                print(f"\n>>> the record in PostgreSQL (table calls; times shown in {ZONE.key}):")
                for key in SHOWN:
                    value = row[key].astimezone(ZONE) if isinstance(row[key], datetime) else row[key]
                    print(f"      {key:<18} {value}")
                line = await pool.fetchrow("SELECT started, result, answered_by, rings, within_ring_limit, "
                                           "wait_seconds, mobile_ring_seconds, talk_seconds, has_sheet "
                                           "FROM v_call_log WHERE linkedid = $1",
                                           row["linkedid"])
                print(">>> what a supervisor sees in v_call_log (docs/supervisors.md):")
                print("      " + ", ".join(f"{key}={value}" for key, value in (line or {}).items()))
                print()
                return
        raise SystemExit("demo: no record appeared within 30 s; see the log above")


def main() -> None:
    configure_logging("warning")  # this script's own AMI client to world stays quiet
    env = load_devenv()
    connected = threading.Event()
    daemon = subprocess.Popen([str(REPO / ".venv" / "bin" / "pbx-bridge"), "run", "--config", str(env.config_path)],
                              stdin=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                              start_new_session=True)  # Ctrl-C reaches us; we stop it in order
    assert daemon.stderr is not None
    threading.Thread(target=show_log, args=(daemon.stderr, connected), daemon=True).start()
    try:
        if not connected.wait(30):
            raise SystemExit("demo: pbx-bridge did not connect to the sandbox AMI within 30 s")
        asyncio.run(demo_call(env))
        print(f">>> pbx-bridge is running against the sandbox; database {env.dsn}")
        print(">>> try: psql " + env.dsn + " -c 'SELECT * FROM v_call_log LIMIT 5'")
        print(">>>      .venv/bin/pbx-bridge report --config " + str(env.config_path) + " --date "
              + datetime.now(ZONE).date().isoformat())
        print(">>> Ctrl-C stops pbx-bridge, the sandbox PBX and PostgreSQL.\n", flush=True)
        daemon.wait()
    except KeyboardInterrupt:
        say("\n>>> stopping pbx-bridge, the sandbox PBX and PostgreSQL")
    finally:
        # Teardown always completes: further Ctrl-C, a closed terminal or a broken pipe
        # must not leave the sandbox or PostgreSQL running.
        for sig in (signal.SIGINT, signal.SIGHUP, signal.SIGPIPE):
            signal.signal(sig, signal.SIG_IGN)
        if daemon.poll() is None:
            daemon.send_signal(signal.SIGTERM)
            try:
                daemon.wait(20)
            except subprocess.TimeoutExpired:
                daemon.kill()
        output = None if say("") else subprocess.DEVNULL  # terminal gone: keep the children quiet
        subprocess.run([sys.executable, str(REPO / "scripts" / "devenv.py"), "down"], check=False,
                       stdout=output, stderr=output)
        say(f">>> stopped (pbx-bridge exit code {daemon.returncode})")


def say(text: str) -> bool:
    """Print, but never let a closed terminal or pipe interrupt the teardown."""
    try:
        print(text, flush=True)
    except OSError:
        return False
    return True


if __name__ == "__main__":
    main()
