"""Stemma's quantization package."""
