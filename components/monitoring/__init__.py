"""Stemma's monitoring package."""
