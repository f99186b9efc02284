"""Raw SIP from a UDP socket, as a stranger on the network would send it (attack tests)."""

from __future__ import annotations

import contextlib
import secrets
import socket
import time
from dataclasses import dataclass, field

# The attack of the security issue: a caller number whose CR/LF (percent-encoded in the SIP From
# user part, which pjproject unescapes) cuts the real Newchannel in two and forges a UserEvent
# claiming a hotline phone dialled out. Asterisk keeps 79 bytes of it.
INJECTION_USER = ("13800000001%0D%0A%0D%0AEvent%3A%20UserEvent%0D%0APrivilege%3A%20user%2Call%0D%0A"
                  "UserEvent%3A%20OutboundAttempt%0D%0ADigits%3A%20999")
# A shorter one whose forged block keeps its whole UserEvent name and digits within 79 bytes.
SHORT_INJECTION_USER = "1%0D%0A%0D%0AEvent%3A%20UserEvent%0D%0AUserEvent%3A%20OutboundAttempt%0D%0ADigits%3A%209"

SDP = ("v=0\r\no=- 1 1 IN IP4 {ip}\r\ns=-\r\nc=IN IP4 {ip}\r\nt=0 0\r\n"
       "m=audio 4000 RTP/AVP 0\r\na=rtpmap:0 PCMU/8000\r\n")


@dataclass
class SipExchange:
    """What came back for one request: every response's status code, and the raw texts."""

    statuses: list[int] = field(default_factory=list)
    responses: list[str] = field(default_factory=list)

    @property
    def final(self) -> int | None:
        """The first final (>= 200) status, if any arrived."""
        return next((s for s in self.statuses if s >= 200), None)


class SipPeer:
    """A UDP SIP endpoint bound to `ip` (any loopback address) that talks to `target`."""

    def __init__(self, ip: str, target: tuple[str, int]) -> None:
        self.ip = ip
        self.target = target
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((ip, 0))
        self.port = self.sock.getsockname()[1]

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> SipPeer:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def _headers(self, method: str, ruri: str, from_user: str, call_id: str, cseq: int, branch: str,
                 tag: str, to_tag: str = "") -> list[str]:
        return [
            f"{method} {ruri} SIP/2.0",
            f"Via: SIP/2.0/UDP {self.ip}:{self.port};branch={branch};rport",
            "Max-Forwards: 70",
            f"From: <sip:{from_user}@{self.ip}>;tag={tag}",
            f"To: <{ruri}>" + (f";tag={to_tag}" if to_tag else ""),
            f"Call-ID: {call_id}",
            f"CSeq: {cseq} {method}",
            f"Contact: <sip:{from_user}@{self.ip}:{self.port}>",
            "User-Agent: attack-test",
        ]

    def request(self, method: str, ruri_user: str, from_user: str, *, extra: tuple[str, ...] = (),
                body: str = "", content_type: str = "application/sdp", wait: float = 5.0) -> SipExchange:
        """Send one request and collect responses until a final one (plus a short grace) or `wait`.

        A final response to an INVITE is acknowledged; a 2xx is acknowledged and hung up (BYE),
        so no test leaves a call behind.
        """
        ruri = f"sip:{ruri_user}@{self.target[0]}:{self.target[1]}"
        call_id, branch, tag = secrets.token_hex(8), "z9hG4bK" + secrets.token_hex(6), secrets.token_hex(4)
        lines = self._headers(method, ruri, from_user, call_id, 1, branch, tag) + list(extra)
        if method == "INVITE" and not body:
            body = SDP.format(ip=self.ip)
        if body:
            lines.append(f"Content-Type: {content_type}")
        lines.append(f"Content-Length: {len(body.encode())}")
        self.sock.sendto(("\r\n".join(lines) + "\r\n\r\n" + body).encode(), self.target)
        exchange = SipExchange()
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            self.sock.settimeout(max(0.05, deadline - time.monotonic()))
            try:
                data, _ = self.sock.recvfrom(65535)
            except TimeoutError:
                break
            text = data.decode("utf-8", "replace")
            first = text.split("\r\n", 1)[0]
            if not first.startswith("SIP/2.0 "):
                continue  # a request from the far end (e.g. a BYE): ignored
            status = int(first.split()[1])
            exchange.statuses.append(status)
            exchange.responses.append(text)
            if status >= 200:
                if method == "INVITE":
                    to_tag = _to_tag(text)
                    self._ack(ruri, from_user, call_id, branch, tag, to_tag, status)
                    if status < 300:
                        self._send(self._headers("BYE", ruri, from_user, call_id, 2,
                                                 "z9hG4bK" + secrets.token_hex(6), tag, to_tag))
                break
        return exchange

    def _ack(self, ruri: str, from_user: str, call_id: str, branch: str, tag: str, to_tag: str,
             status: int) -> None:
        # A non-2xx ACK reuses the INVITE's branch (same transaction); a 2xx ACK is a new one.
        ack_branch = branch if status >= 300 else "z9hG4bK" + secrets.token_hex(6)
        self._send(self._headers("ACK", ruri, from_user, call_id, 1, ack_branch, tag, to_tag))

    def _send(self, lines: list[str]) -> None:
        with contextlib.suppress(OSError):
            self.sock.sendto(("\r\n".join([*lines, "Content-Length: 0"]) + "\r\n\r\n").encode(), self.target)


def _to_tag(response: str) -> str:
    for line in response.split("\r\n"):
        if line.lower().startswith(("to:", "t:")) and ";tag=" in line:
            return line.split(";tag=", 1)[1].split(";")[0].strip()
    return ""
