"""Stemma's lineage package."""
