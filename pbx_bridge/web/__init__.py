"""The wallboard for the hotline room: a page and its Server-Sent Events stream, served by the ops API."""

from pbx_bridge.web.board import Wallboard
from pbx_bridge.web.changes import Changes

__all__ = ["Changes", "Wallboard"]
