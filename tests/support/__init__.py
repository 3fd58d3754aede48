"""Helpers the tests share (import them from here, not from conftest)."""
