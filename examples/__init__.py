"""Stemma's examples package."""
