"""Stemma's evaluation package."""
