"""Stemma\x27s Prefect flows and command-line interface."""
