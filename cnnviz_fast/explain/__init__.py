"""Explanation methods, by family."""
