"""Where virtio-net devices send and receive frames: a TAP device, or a switch of their own."""
