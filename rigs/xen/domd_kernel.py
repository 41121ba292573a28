"""A small arm64 kernel for the rig's driver domain, with privcmd's ioeventfd and irqfd.

Linux 6.7 added ``IOCTL_PRIVCMD_IOEVENTFD`` and ``IOCTL_PRIVCMD_IRQFD`` (``XEN_PRIVCMD_EVENTFD``,
which depends on ``XEN_VIRTIO``): the kernel completes a guest's QueueNotify IOREQ itself and
signals an eventfd, and raises an interrupt with ``XEN_DMOP_set_irq_level`` when an eventfd is
written. Debian's arm64 kernels have neither (bookworm's 6.1 is too old; bookworm-backports'
6.12 is built without ``XEN_VIRTIO``), so this one is cross-built from bookworm-backports'
``linux-source-6.12``: ``allnoconfig`` plus :data:`CONFIG`, everything built in. Beside what a
backend needs (event channels, privcmd, gntdev, xenstore) it has the PV block backend and loop
devices. ``xen_privcmd.unrestricted=1`` on its command line lets privcmd reach other domains
(dom0-lib.sh's ``domd_config`` passes it).

Cached under ``<cache>/xen/domd-kernel/<source version>-<hash>/`` like the grant kernel
(:func:`rigs.xen.grant_kernel.build_kernel`); ``python -m rigs.xen.domd_kernel`` builds it.
"""

from __future__ import annotations

from pathlib import Path

from rigs.cache import build_lock
from rigs.xen import xen_cache_dir
from rigs.xen.apt import ForeignApt, backports_sources_text
from rigs.xen.grant_kernel import USERLAND_CONFIG, GrantKernel, build_kernel

SOURCE_PACKAGE = "linux-source-6.12"
BUILD_FORMAT = 1  # bump to rebuild
DOMD_IMAGE_NAME = "Image-domd"  # its name in dom0's /domu (XenTest.domu_kernels)

#: Set on top of allnoconfig; each must be ``=y`` in the result.
CONFIG = (
    *USERLAND_CONFIG,
    # what Python and the daemon use beside it
    "EPOLL",
    "EVENTFD",
    "SIGNALFD",
    "TIMERFD",
    "NET",
    "UNIX",
    # an arm64 Xen guest with its console on hvc0
    "OF",
    "XEN",
    "HVC_XEN",
    # a backend: event channels, hypercalls (with ioeventfd and irqfd), grants, xenfs
    "XEN_DEV_EVTCHN",
    "XEN_PRIVCMD",
    "VIRTIO_MENU",
    "VIRTIO_MMIO",  # the only way to VIRTIO, which XEN_VIRTIO needs (nothing else of it is used)
    "XEN_VIRTIO",
    "XEN_PRIVCMD_EVENTFD",
    "XEN_GNTDEV",
    "XENFS",
    # the PV block backend over loop devices
    "XEN_BACKEND",
    "BLOCK",
    "BLK_DEV",
    "BLK_DEV_LOOP",
    "XEN_BLKDEV_BACKEND",
)


def ensure_domd_kernel(into: Path | None = None) -> GrantKernel:
    """Build (once) the driver domain kernel into ``into`` (default
    ``<cache>/xen/domd-kernel``); RigError if it cannot be built."""
    into = into or xen_cache_dir("domd-kernel")
    with build_lock("xen-domd-kernel"):
        apt = ForeignApt(
            xen_cache_dir("apt-backports"),
            xen_cache_dir("debs"),
            sources=backports_sources_text("arm64"),
        )
        apt.update()
        return build_kernel(apt, SOURCE_PACKAGE, CONFIG, None, BUILD_FORMAT, into)


if __name__ == "__main__":
    kernel = ensure_domd_kernel()
    size = kernel.image.stat().st_size
    print(f"{SOURCE_PACKAGE} {kernel.version}: {kernel.image} ({size} bytes)")
