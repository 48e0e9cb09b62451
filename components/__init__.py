"""Stemma\x27s building blocks: plain, typed functions with no Prefect imports."""
