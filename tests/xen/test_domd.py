"""The backend in a driver domain (DomD), not in dom0: the talk's deployment.

Xen boots with Flask (``xsm=flask``: the policy built into the rig's hypervisor, Xen's example
policy plus ``rigs/xen/pyvirtio_domd.te``). dom0 creates a driver domain (``driver_domain =
1``, label ``pyvirtio_domd_t``, Linux 6.12 from :mod:`rigs.xen.domd_kernel`) that makes the disk
image and runs ``pyvirtio xen``, and then a domU whose disk says ``backend=domd``. The driver
domain's kernel has privcmd irqfd: the interrupts go through it (QueueNotify stays the daemon's:
privcmd's ioeventfd handler can crash the guest, see docs/xen.md). libxl gives that disk's
device tree node ``iommus = <&xen_grant_dma DOMD>``, so the domU's kernel (Debian's linux-source-6.1 built with
``XEN_VIRTIO``: :mod:`rigs.xen.grant_kernel`; Debian's own arm64 kernels lack it) passes every
ring and buffer as a grant to DomD.

The policy gives the driver domain the IOREQ server, the interrupt, event channels and the
grants the guest gives it, and not the foreign mapping of guest memory: while the domU runs,
DomD fails to map a frame of its RAM, and the grant the guest gave dom0 for xenstore, where
dom0 maps both. The domU is destroyed in the middle of I/O and created again, and writes, reads
and checks an ext4 file system; DomD then checks its image.
"""

from __future__ import annotations

import functools
import json
import re

import pytest
from rigs import RigError
from rigs.xen.domd_kernel import DOMD_IMAGE_NAME, ensure_domd_kernel
from rigs.xen.grant_kernel import GRANT_IMAGE_NAME, GrantKernel, ensure_grant_kernel

from pyvirtio.spec.features import Feature
from tests.xen.conftest import Runner
from tests.xen.test_disk import DOM0_CHECK_IMAGE, DOMU_BUSY, DOMU_FS, _assert_fs
from tests.xen.test_grants import GRANT_STATS

pytestmark = pytest.mark.xen

DOMD_LABEL = "system_u:system_r:pyvirtio_domd_t"
#: GUEST_RAM0_BASE (xen/include/public/arch-arm.h): the first frame of a guest's RAM.
GUEST_RAM0_GFN = 0x4000_0000 >> 12
#: GNTTAB_RESERVED_XENSTORE (xen/include/public/grant_table.h): the guest grants its xenstore
#: ring to dom0, never to a driver domain.
XENSTORE_GREF = 1
AVC_DENIED = r"avc:  denied  \{ ([^}]*) \} .*scontext=(\S+) tcontext=(\S+) tclass=(\w+)"

# What this domain may map of domain DOMID: a frame of its RAM (foreign mapping) and the grant
# it gave dom0 for xenstore. Prints "TAG KEY.foreign|grant mapped|denied ERRNO".
PROBE = rf"""
import errno, sys
sys.path.insert(0, "/opt/pyvirtio")
from pyvirtio.shims.xen.gntdev import Gntdev
from pyvirtio.shims.xen.privcmd import Privcmd
domid, tag, key = int(sys.argv[1]), sys.argv[2], sys.argv[3]
def say(what, ok, err=0):
    name = errno.errorcode.get(err, str(err))
    print(f"{{tag}} {{key}}.{{what}}", "mapped" if ok else f"denied {{name}}", flush=True)
privcmd = Privcmd()
m = privcmd.map(domid, {GUEST_RAM0_GFN:#x}, 1)
if m.bad:
    say("foreign", False, m.errors[0])
else:
    say("foreign", True)
    print(f"{{tag}} {{key}}.foreign_bytes", bytes(m.view[:4]).hex(), flush=True)
m.close()
privcmd.close()
gntdev = Gntdev()
try:
    gntdev.map(domid, {XENSTORE_GREF}, 1, writable=False).close()
    say("grant", True)
except OSError as exc:
    say("grant", False, exc.errno or 0)
"""

DOM0 = rf"""
flask_mode
cat >/etc/rigs/probe.py <<'PY'
{PROBE}
PY
cat >/etc/rigs/check.sh <<'SH'
{DOM0_CHECK_IMAGE}
SH
DOMD_KERNEL=/domu/{DOMD_IMAGE_NAME}
domd_start domd 'seclabel = "{DOMD_LABEL}"' || fail "the driver domain did not start"
result flask.map_guests "$(flask-get-bool pyvirtio_domd_map_guests)"
result domd.label "$(xl list -Z domd | sed -n 's/.* \(system_u:[^ ]*\).*/\1/p')"
domd_sh domd "make_disk /tmp/a.img 64; backend_start" || {{ domu_console domd; fail "no backend in DomD"; }}
domu_kernel Image-grants

# A domU busy with I/O: the probes while it runs, then destroyed in the middle of it.
domu_config g1 busy "$(vdisk xvda /tmp/a.img rw domd)"
domu_create g1 || {{ domd_sh domd backend_log; domu_console domd; fail "xl create (busy)"; }}
n=0
until grep -q '@@GUEST busy_rounds' "$CONSOLE_DIR/guest-g1.log" 2>/dev/null; do
    n=$((n + 1))
    [ "$n" -gt 3000 ] && {{ domu_console g1; domd_sh domd backend_log; fail "the domU never got busy"; }}
    usleep 100000
done
G=$(xl domid g1)
python3 /etc/rigs/probe.py "$G" @@RESULT dom0
domd_sh domd "python3 /etc/rigs/probe.py $G @@GUEST probe"
xs_dump "/local/domain/$(xl domid domd)/backend/virtio_disk"
xl destroy g1
result destroy.rc $?
sleep 3
domd_sh domd '. /etc/rigs/check.sh; backend_check after_destroy'

# Created again: patterns, ext4, fsck; then DomD checks the image.
domu_run g1 fs 300 "$(vdisk xvda /tmp/a.img rw domd)"
rc=$?
sleep 2  # the toolstack removes the disk; the daemon logs its map cache statistics
domd_sh domd '. /etc/rigs/check.sh; backend_check after_recreate; check_image /tmp/a.img a; backend_log'
xl dmesg | grep 'avc:' | sed 's/^/avc| /'
domu_console domd
domu_results domd
exit $rc
"""

# domU: where its disk's grants go (the device tree's iommus: phandle, backend domid) and
# what the device negotiated.
DOMU_GRANTS = r"""
result kernel "$(uname -r)"
for node in /sys/firmware/devicetree/base/virtio@*; do
    [ -e "$node/iommus" ] && result iommus "$(xxd -p "$node/iommus" | tr -d '\n')"
done
result dom0_backend "$(dmesg | grep -c 'Using dom0 as backend')"
f=$(cat /sys/bus/virtio/devices/virtio0/features)
result virtio0.features "$f"
result virtio0.driver "$(basename "$(readlink /sys/bus/virtio/devices/virtio0/driver)")"
"""


@pytest.fixture(scope="session")
def grant_kernel() -> GrantKernel:
    try:
        return ensure_grant_kernel()
    except (RigError, OSError) as exc:
        pytest.fail(f"cannot build the grant kernel: {exc}", pytrace=False)


@pytest.fixture(scope="session")
def domd_kernel() -> GrantKernel:
    """The driver domain's kernel (Linux 6.12 with privcmd ioeventfd and irqfd)."""
    try:
        return ensure_domd_kernel()
    except (RigError, OSError) as exc:
        pytest.fail(f"cannot build the driver domain kernel: {exc}", pytrace=False)


def test_driver_domain_serves_a_grant_guest(
    xen_run: Runner, grant_kernel: GrantKernel, domd_kernel: GrantKernel
) -> None:
    run = functools.partial(
        xen_run,
        domu_kernels={GRANT_IMAGE_NAME: grant_kernel.image, DOMD_IMAGE_NAME: domd_kernel.image},
        xen_args=("xsm=flask",),
    )
    result = run(DOM0, {"busy": DOMU_BUSY, "fs": DOMU_GRANTS + DOMU_FS}, check=False)
    r = result.results
    console = result.console
    assert r.get("flask.mode") == "Enforcing", r
    assert r.get("domd.label") == DOMD_LABEL, r
    domd = r["domd.domid"]

    # The guest passed its buffers as grants to DomD, and only grants were mapped.
    guest = re.findall(r"^g1\| .*$", console, re.MULTILINE)
    assert r.get("g1.exit") == "0", "the domU failed:\n" + "\n".join(guest[-40:])
    assert r["g1.iommus"].endswith(f"{int(domd):08x}"), r["g1.iommus"]
    assert r["g1.dom0_backend"] == "0", r
    assert r["g1.virtio0.driver"] == "virtio_blk", r
    assert r["g1.virtio0.features"][Feature.ACCESS_PLATFORM] == "1", r
    stats = re.findall(f"domd\\| backend\\| .*{GRANT_STATS}", console)
    assert len(stats) == 2, f"the daemon did not report both guests' mappings: {stats}"
    assert all(m == "0" and 1 <= int(r) <= 6 and int(c) >= 100 for m, r, c in stats), stats

    # The driver domain's kernel raised every interrupt (the daemon wrote the irqfd); the
    # daemon served every QueueNotify, and no IOREQ was the kernel's.
    assert (
        "notifications through the IOREQ thread (QueueNotify) and the kernel (interrupts: "
        "privcmd irqfd)" in console
    )
    for record in re.findall(r"domd\| backend\| .*: stats (\{.*\})$", console, re.MULTILINE):
        figures = json.loads(record)
        assert figures["ioreq"]["served"]["notify"] > 0, figures
        assert figures["ioreq"]["kernel"] == 0 and figures["ioreq"]["outwaits"] == 0, figures
        assert figures["interrupts"]["irqfd"] and figures["interrupts"]["raised"] > 0, figures

    # dom0 may map the guest's RAM; DomD may not, nor a grant the guest gave dom0.
    assert r["flask.map_guests"] == "pyvirtio_domd_map_guests: 0", r
    assert r["dom0.foreign"] == "mapped" and r["dom0.grant"] == "mapped", r
    assert r["domd.probe.foreign"].startswith("denied"), r
    assert r["domd.probe.grant"].startswith("denied"), r
    denials = set(re.findall(AVC_DENIED, console))
    assert denials == {("map_read map_write", DOMD_LABEL, "system_u:system_r:domU_t", "mmu")}, (
        f"the policy denied more than the probe's foreign mapping: {denials}"
    )

    # Destroyed mid-I/O, created again: the daemon in DomD lived on and served it.
    assert r["destroy.rc"] == "0", r
    assert r["domd.backend.after_destroy"] == "1", r
    assert r["domd.backend.after_recreate"] == "1", r
    checked = {k.removeprefix("domd."): v for k, v in r.items() if k.startswith("domd.dom0.")}
    _assert_fs({**r, **checked}, "g1", "a")
