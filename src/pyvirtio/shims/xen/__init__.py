"""Xen: an IOREQ server that serves virtio-mmio devices to unmodified guests.

Modules that need Xen's libraries load them lazily, so that pyvirtio imports and its other
tests run on machines without Xen.
"""
