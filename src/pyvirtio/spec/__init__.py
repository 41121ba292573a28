"""Constants and structure layouts from the VIRTIO specification (1.2, plus 1.3 draft fields)."""
