"""Virtqueues, device side."""
