"""Stemma's model runtime: every inference goes through it (see README.md)."""
