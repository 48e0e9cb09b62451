"""Stemma's model package."""
