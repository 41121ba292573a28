"""Concrete virtio devices."""
