"""Stemma's data package."""
