"""The arm64 Xen rig: Xen 4.17 (rebuilt with the IOREQ server) + a Debian dom0 in
``qemu-system-aarch64`` (TCG), which runs ``pyvirtio xen`` and boots domUs through ``xl``.

Everything comes from Debian (arm64 packages and the xen source package) and is built into
``<cache>/xen/`` (see :func:`xen_cache_dir`), keyed by package versions. Entry points:

* :func:`rigs.xen.build.ensure_rig` -- the hypervisor, kernel and both base initramfs archives;
* :class:`rigs.xen.harness.XenTest` -- one boot: a dom0 script, domU scripts, the backend command
  (also ``python -m rigs.xen.harness DOM0.sh [NAME=DOMU.sh ...]``);
* :class:`rigs.xen.qemu.XenMachine` -- the boot itself;
* :func:`rigs.xen.grant_kernel.ensure_grant_kernel` -- a small domU kernel whose virtio devices
  use grants (built on demand, not by ``ensure_rig``; ``XenTest(domu_kernels=...)`` carries it).

Shell side: ``rigs/xen/sh/`` (dom0 and domU /init, and the function libraries test scripts use).
"""

from __future__ import annotations

from pathlib import Path

from rigs.cache import cache_dir


def xen_cache_dir(*parts: str) -> Path:
    """``<cache>/xen/<parts...>``, created if needed."""
    path = cache_dir().joinpath("xen", *parts)
    path.mkdir(parents=True, exist_ok=True)
    return path
