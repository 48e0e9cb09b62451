"""Stemma's training package."""
