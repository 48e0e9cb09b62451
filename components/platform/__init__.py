"""Stemma's platform package."""
