"""pbx-bridge: enforces a 400 hotline's rules on Asterisk and records every call in PostgreSQL."""

__version__ = "0.1.0"
