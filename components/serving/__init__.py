"""Stemma's online endpoint (see README.md)."""
