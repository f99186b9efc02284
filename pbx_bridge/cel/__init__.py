"""Calls rebuilt from Asterisk's Channel Event Log: the pure builder and the reconcile."""

from pbx_bridge.cel.builder import CelCall, CelRow, build_call

__all__ = ["CelCall", "CelRow", "build_call"]
