"""Tell forged AMI events from Asterisk's own, per connection (pure: no I/O, no clock).

A stranger's CR/LF in a SIP caller number reaches the AMI stream unescaped and splits a real
event: the part before the caller number stays a (headless-tailed) event, the stranger's text
becomes blocks of its own, and the rest of the real event becomes a block without `Event:`.
Each check here catches one shape of that:
  * a block with no `Event:` (the cut-off tail of a real event)           -> `fragment`
  * an event whose `SequenceNumber` does not rise (manager.conf `debug = on` numbers every
    event with one counter; a forged block cannot know it)                 -> `sequence`
  * an event without a `SequenceNumber` on a numbered stream              -> `unsequenced`
  * a channel event without its whole channel snapshot (Channel ... Uniqueid, Linkedid: the
    cut-off head, or a forged block that absorbed a real tail)            -> `identity`
  * a repeated header (a forged block that absorbed a real tail)          -> `duplicate_headers`
Asterisk keeps at most 79 bytes of the SIP user part as the caller number or the dialled
number, too few for a forged block that passes all of these. A forged block that guesses a
SequenceNumber above the real one is found when the next real event arrives lower: that one
is kept, and the forged number is reported, so a guess never makes real events look forged.
Suspect messages are dropped, never applied; the caller raises a security alert for each.
"""

from __future__ import annotations

from dataclasses import dataclass

from pbx_bridge.ami.wire import AmiMessage

# Sent to one session only (at login), so never numbered.
UNNUMBERED_EVENTS = frozenset({"FullyBooted"})
# Every channel event carries the channel's whole snapshot, in this order; a two-channel event
# repeats it for the second channel with the prefix "Dest".
SNAPSHOT = ("channel", "channelstate", "calleridnum", "calleridname", "connectedlinenum", "connectedlinename",
            "context", "exten", "priority", "uniqueid", "linkedid")
IDENTITY = ("channel", "uniqueid", "linkedid")
RECENT = 8  # sequence numbers remembered to tell a forged high guess from a real event


@dataclass(frozen=True, slots=True)
class Suspicion:
    """Why a message was dropped, and which channel it names (as far as it names one)."""

    reason: str
    event: str
    channel: str
    uniqueid: str
    detail: str


class StreamIntegrity:
    """Checks one AMI connection's events in arrival order. Make a new one per connection."""

    def __init__(self) -> None:
        self._recent: list[int] = []  # the last RECENT accepted sequence numbers, rising
        self.numbered: bool | None = None  # None until the first numbered-or-not event decides
        self.forged_after_the_fact: list[int] = []  # accepted numbers a later real event proved forged

    def check(self, message: AmiMessage) -> Suspicion | None:
        """None if `message` may be applied; else why it must be dropped."""
        name = message.event
        if not name:
            return _suspect("fragment", message, "a block without Event: (the tail of a split event?)")
        if message.duplicates:
            return _suspect("duplicate_headers", message, "repeated " + ",".join(sorted(message.duplicates)))
        raw = message.get("SequenceNumber")
        if raw:
            if not (raw.isascii() and raw.isdigit() and len(raw) <= 20):
                return _suspect("sequence", message, f"SequenceNumber {raw[:40]!r} is not a number")
            if self.numbered is False:
                return _suspect("sequence", message, "a numbered event on an unnumbered stream")
            sequence = int(raw)
            if self._recent and sequence <= self._recent[-1]:
                lower = [n for n in self._recent if n < sequence]
                if not lower or sequence in self._recent:  # Asterisk never repeats a number
                    return _suspect("sequence", message, f"SequenceNumber {sequence} after {self._recent[-1]}")
                # Real events rise: those accepted above this one were forged guesses (already
                # applied; reported now), and this one continues the real sequence.
                self.forged_after_the_fact += [n for n in self._recent if n >= sequence]
                self._recent = lower
            self.numbered = True
            self._recent = [*self._recent, sequence][-RECENT:]
        elif name not in UNNUMBERED_EVENTS:
            if self.numbered:
                return _suspect("unsequenced", message, "an event without SequenceNumber on a numbered stream")
            self.numbered = False
        for prefix in ("", "dest"):
            if any(prefix + name in message for name in IDENTITY):
                missing = [name for name in SNAPSHOT if prefix + name not in message]
                if missing or not (message.get(prefix + "uniqueid") and message.get(prefix + "linkedid")):
                    return _suspect("identity", message,
                                    f"a channel event without its whole {prefix or 'channel'} snapshot "
                                    f"(missing {','.join(missing) or 'uniqueid/linkedid value'})")
        return None


def _suspect(reason: str, message: AmiMessage, detail: str) -> Suspicion:
    return Suspicion(reason=reason, event=message.event[:64], channel=message.get("Channel")[:128],
                     uniqueid=message.get("Uniqueid")[:64], detail=detail)
