"""Allows `python -m pbx_bridge`."""

from pbx_bridge.cli import main

main()
