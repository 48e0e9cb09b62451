"""Stemma's registry package."""
