"""pyvirtio: VirtIO device backends in Python.

The package is layered so that the architecture shows in the file tree:

- ``spec``: constants and layouts from the VIRTIO specification,
- ``memory``: guest-physical memory as seen by a backend, and barriers,
- ``virtqueue``: the device side of the split virtqueue,
- ``device`` and ``devices``: the generic device model and concrete devices,
- ``storage``: the block backends a virtio-blk device stores to,
- ``transport``: register-level transports (virtio-mmio),
- ``driver``: an in-process driver that plays the guest,
- ``vhost_user`` and ``xen``: shims that connect devices to a hypervisor.
"""

__version__ = "0.1.0"
