"""Durable state: the only code that touches SQLite or the spool directory."""
