"""Stemma's scoring package."""
