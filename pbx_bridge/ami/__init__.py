"""Asterisk Manager Interface: wire format (pure) and the connection adapter over panoramisk."""
