"""Shims: what connects a device to a hypervisor, a VMM, or an in-process driver."""
