"""An in-process driver that plays the guest, as Linux's virtio drivers do."""
