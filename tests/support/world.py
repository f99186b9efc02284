"""Drives the sandbox's "world" Asterisk: outside callers and the agents' phones.

It talks to world's AMI with pbx-bridge's own AmiClient (so the UTF-8 and escaping paths
are exercised here too). Per-call phone behaviour is keyed by the caller's number, so
concurrent calls can each have their own script.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import secrets
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import quote

from pbx_bridge.ami.client import AmiClient
from pbx_bridge.ami.wire import AmiMessage
from pbx_bridge.routing import STATE_GLOBALS
from tests.support.env import DevEnv


def answer(after: float, talk: float) -> str:
    """Phone plan: ring `after` seconds, answer, talk `talk` seconds, hang up."""
    return f"answer:{after:g}:{talk:g}"


def answer_after_silence(silent: float, after: float, talk: float) -> str:
    """Phone plan of a far end that sends 180 Ringing only after `silent` seconds, then rings
    `after` seconds, answers and talks `talk` seconds."""
    return f"ring:{silent:g}:{after:g}:{talk:g}"


def answer_after_progress(after: float, talk: float) -> str:
    """Phone plan of a far end that sends 183 Session Progress (early media, no 180), answers
    after `after` seconds and talks `talk` seconds."""
    return f"progress:{after:g}:{talk:g}"


def answer_without_ringing(after: float, talk: float) -> str:
    """Phone plan of a far end that signals no ringing at all, answers after `after` seconds."""
    return f"silent:{after:g}:{talk:g}"


BUSY = "busy"
IGNORE = "ignore"


def new_caller_number() -> str:
    """A fresh mobile-looking caller number, so each test's calls are its own."""
    return "139" + "".join(secrets.choice("0123456789") for _ in range(8))


class World:
    """Actions on the world instance."""

    def __init__(self, client: AmiClient) -> None:
        self._client = client

    async def action(self, fields: dict[str, str | list[str]]) -> Any:
        """Send an action; only its first response is awaited (an async Originate returns at once)."""
        response = await self._client.send_action(fields, as_list=False)
        if response.get("Response") != "Success":
            raise RuntimeError(f"world refused {fields.get('Action')}: {response.get('Message')}")
        return response

    async def set_phone(self, caller_number: str, phone: str, plan: str) -> None:
        """How `phone` reacts to calls from `caller_number` (see answer/BUSY/IGNORE)."""
        await self.action({"Action": "DBPut", "Family": f"phone/{caller_number}", "Key": phone, "Val": plan})

    async def call(self, did: str, caller_number: str, caller_name: str = "", *,
                   patience: float | None = None, talk: float | None = None) -> None:
        """An outside caller dials `did` through the carrier.

        `patience`: seconds the caller lets it ring before hanging up (default: an hour).
        `talk`: seconds after answer before the caller hangs up (default: the agent ends it).
        """
        variables = [f"CALLER_NUM={caller_number}",
                     "CALLER_NAME_B64=" + base64.b64encode(caller_name.encode()).decode()]
        if patience is not None:
            variables.append(f"CALLER_PATIENCE={patience:g}")
        if talk is not None:
            variables.append(f"CALLER_TALK={talk:g}")
        await self.action({
            "Action": "Originate", "Channel": f"Local/{did}@outside-caller/n",
            "Application": "Wait", "Data": "3600", "Async": "true", "Variable": variables,
            "Timeout": "3600000",  # Originate's own 30 s default would hang up long-ringing callers
        })


    async def phone_channel(self, phone: str, caller_number: str) -> str:
        """The channel on which `phone` is talking with (or rung by) `caller_number`."""
        listing = await self._client.send_action({"Action": "CoreShowChannels"}, as_list=True)
        found = [str(m.get("Channel")) for m in listing
                 if m.get("Event") == "CoreShowChannel" and m.get("Context") == "phone" and m.get("Exten") == phone
                 and m.get("CallerIDNum") == caller_number]
        if len(found) != 1:
            raise RuntimeError(f"{phone} has {len(found)} calls from {caller_number}")
        return found[0]

    async def transfer(self, phone: str, caller_number: str, refer_to: str) -> None:
        """`phone`, on a call with `caller_number`, transfers it by SIP REFER to `refer_to` (a SIP
        URI, e.g. sip:103@<pbx address>: a blind transfer)."""
        channel = await self.phone_channel(phone, caller_number)
        await self.action({"Action": "Setvar", "Channel": channel, "Variable": "XFER_REFER_TO", "Value": refer_to})
        await self.action({"Action": "Redirect", "Channel": channel, "Context": "phone-transfer", "Exten": "go",
                           "Priority": "1"})

    async def attended_transfer(self, phone: str, caller_number: str, extension: str, pbx: str) -> None:
        """`phone`, on a call with `caller_number`, has consulted `extension` (`dial_out`); it now
        hands the caller over: a REFER whose Refer-To carries Replaces naming the consultation's
        dialog (RFC 3891; to-tag is the pbx's tag of it, from-tag the phone's), as IP phones do."""
        listing = await self._client.send_action({"Action": "CoreShowChannels"}, as_list=True)
        consults = [str(m.get("Channel")) for m in listing if m.get("Event") == "CoreShowChannel"
                    and str(m.get("Channel")).startswith(f"PJSIP/as-{phone}-")]
        if len(consults) != 1:
            raise RuntimeError(f"{phone} has {len(consults)} consultation calls")
        dialog = {}
        for name in ("call-id", "local_tag", "remote_tag"):
            reply = await self.action({"Action": "Getvar", "Channel": consults[0],
                                       "Variable": f"CHANNEL(pjsip,{name})"})
            dialog[name] = str(reply.get("Value") or "")
        replaces = (f"{quote(dialog['call-id'], safe='')}%3Bto-tag%3D{quote(dialog['remote_tag'], safe='')}"
                    f"%3Bfrom-tag%3D{quote(dialog['local_tag'], safe='')}")
        await self.transfer(phone, caller_number, f"<sip:{extension}@{pbx}?Replaces={replaces}>")

    async def hang_up_caller(self, caller_number: str) -> None:
        """The outside caller `caller_number` puts the phone down."""
        listing = await self._client.send_action({"Action": "CoreShowChannels"}, as_list=True)
        mine = [str(m.get("Channel")) for m in listing if m.get("Event") == "CoreShowChannel"
                and m.get("Context") == "outside-caller" and m.get("CallerIDNum") == caller_number]
        if not mine:
            raise RuntimeError(f"no call from {caller_number}")
        for channel in mine:
            await self.action({"Action": "Hangup", "Channel": channel})

    async def dial_out(self, phone: str, digits: str) -> None:
        """Phone `phone` (an endpoint on the pbx: a hotline phone, or office201) dials `digits`.

        The number dialled, if the pbx puts the call through (office201's go out through the
        ordinary line "pstn"), reacts as `set_phone(phone, digits, plan)` says.
        """
        await self.action({
            "Action": "Originate", "Channel": f"Local/{digits}@phone-dialer/n", "Application": "Wait",
            "Data": "60", "Async": "true", "Variable": [f"PHONE={phone}"], "Timeout": "60000",
        })


class PbxAdmin(World):
    """The sandbox's own superuser on the pbx under test (for tests to poke at AstDB and globals)."""

    async def delete_routing_state(self) -> None:
        """As after an Asterisk restart: pbx-bridge's routing-state globals unset."""
        for name in STATE_GLOBALS.values():
            await self.set_global(name, "")

    async def set_routing_state(self, **values: str) -> None:
        """Set routing-state globals by key (open, mobile, holder_b64, updated), as pbx-bridge does."""
        for key, value in values.items():
            await self.set_global(STATE_GLOBALS[key], value)

    async def put(self, family: str, key: str, value: str) -> None:
        await self.action({"Action": "DBPut", "Family": family, "Key": key, "Val": value})

    async def set_global(self, name: str, value: str) -> None:
        await self.action({"Action": "Setvar", "Variable": name, "Value": value})


@contextlib.asynccontextmanager
async def ami_session(port: int, username: str, secret: str) -> AsyncIterator[AmiClient]:
    """A logged-in AMI session on the sandbox for the duration of the block (events ignored)."""
    def ignore(_: AmiMessage) -> None:
        return None

    client = AmiClient(host="127.0.0.1", port=port, username=username, secret=secret, on_event=ignore,
                       on_suspicion=lambda _: None)  # the harness reads all classes (VarSet of globals...)
    task = asyncio.create_task(client.run())
    try:
        await asyncio.wait_for(client.connected.wait(), 10)
        yield client
    finally:
        client.stop()
        await task


def _admin(env: DevEnv, instance: str) -> contextlib.AbstractAsyncContextManager[AmiClient]:
    return ami_session(int(str(env.sandbox[f"{instance}_ami_port"])), "sandbox",
                       str(env.sandbox[f"{instance}_admin_secret"]))


@contextlib.asynccontextmanager
async def connect_world(env: DevEnv) -> AsyncIterator[World]:
    """A logged-in World for the duration of the block."""
    async with _admin(env, "world") as client:
        yield World(client)


@contextlib.asynccontextmanager
async def connect_pbx_admin(env: DevEnv) -> AsyncIterator[PbxAdmin]:
    """The pbx instance's sandbox superuser for the duration of the block."""
    async with _admin(env, "pbx") as client:
        yield PbxAdmin(client)
