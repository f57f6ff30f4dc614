"""Imported by sibling_import.py from its own folder."""

VALUE = 42
