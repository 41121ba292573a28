"""The Xen rig itself, without pyvirtio: Xen + dom0 boot, the hypervisor has the IOREQ server,
a domU boots and reports back, and what libxl writes for a virtio disk (the backend's
contract: xenstore nodes, the guest's device tree node)."""

from __future__ import annotations

import pytest

from tests.xen.conftest import Runner

pytestmark = pytest.mark.xen

# Creates an IOREQ server for a (paused) domU through libxendevicemodel, as pyvirtio does.
IOREQ_PROBE = r"""
import ctypes, os, sys
domid = int(sys.argv[1])
dm = ctypes.CDLL("libxendevicemodel.so.1", use_errno=True)
dm.xendevicemodel_open.restype = ctypes.c_void_p
dm.xendevicemodel_open.argtypes = [ctypes.c_void_p, ctypes.c_uint]
dm.xendevicemodel_create_ioreq_server.argtypes = [
    ctypes.c_void_p, ctypes.c_uint16, ctypes.c_int, ctypes.POINTER(ctypes.c_uint16)]
dm.xendevicemodel_destroy_ioreq_server.argtypes = [
    ctypes.c_void_p, ctypes.c_uint16, ctypes.c_uint16]
handle = dm.xendevicemodel_open(None, 0)
print("@@RESULT ioreq.open", int(bool(handle)))
sid = ctypes.c_uint16(0xFFFF)
rc = dm.xendevicemodel_create_ioreq_server(handle, domid, 0, ctypes.byref(sid))
err = ctypes.get_errno() if rc else 0
print("@@RESULT ioreq.create_rc", rc)
print("@@RESULT ioreq.errno", err, os.strerror(err) if err else "")
if rc == 0:
    print("@@RESULT ioreq.server_id", sid.value)
    rc = dm.xendevicemodel_destroy_ioreq_server(handle, domid, sid.value)
    print("@@RESULT ioreq.destroy_rc", rc)
# Buffered IOREQs (HVM_IOREQSRV_BUFIOREQ_ATOMIC = 2): x86 only in Xen 4.17.
rc = dm.xendevicemodel_create_ioreq_server(handle, domid, 2, ctypes.byref(sid))
err = ctypes.get_errno() if rc else 0
print("@@RESULT ioreq.bufioreq", rc, os.strerror(err) if err else "")
if rc == 0:
    dm.xendevicemodel_destroy_ioreq_server(handle, domid, sid.value)
"""

DOM0_IOREQ = f"""
xl info | sed 's/^/xl-info| /'
result xen.version "$(xl info | sed -n 's/^xen_version *: //p')"
result xen.caps "$(xl info | sed -n 's/^xen_caps *: //p')"
result xen.commandline "$(xl info | sed -n 's/^xen_commandline *: //p')"
result dom0.kernel "$(uname -r)"
result dom0.python "$(python3 -c 'import sys; print(sys.version.split()[0])')"
result dom0.find_library "$(python3 -c 'from ctypes.util import find_library as f; print(f("atomic"), f("c"), f("xendevicemodel"))')"
xl dmesg | grep -i -E 'ioreq|xen version|dom0' | sed 's/^/xl-dmesg| /'
cat >/tmp/probe.py <<'PY'
{IOREQ_PROBE}
PY
domu_config p1 main
xl create -p /etc/xen/p1.cfg >/tmp/p1.log 2>&1 || {{ cat /tmp/p1.log; fail "xl create -p"; }}
domid=$(xl domid p1)
result p1.domid "$domid"
python3 /tmp/probe.py "$domid"
xl destroy p1
result p1.destroyed "$(xl domid p1 >/dev/null 2>&1 && echo 0 || echo 1)"
"""


def test_xen_dom0_and_ioreq_server(xen_run: Runner) -> None:
    """Xen and dom0 come up; the rebuilt hypervisor accepts XEN_DMOP_create_ioreq_server, and
    refuses a server with buffered IOREQs (Xen 4.17 has them on x86 only)."""
    result = xen_run(DOM0_IOREQ, backend=None)
    r = result.results
    assert r["xen.version"].startswith("4.17"), r
    assert "xen-3.0-aarch64" in r["xen.caps"], r
    assert r["dom0.python"].startswith("3.11"), r
    assert r["dom0.find_library"].split()[0] == "libatomic.so.1", r
    assert r["ioreq.open"] == "1", r
    assert r["ioreq.create_rc"] == "0", f"IOREQ server creation failed: {r.get('ioreq.errno')}"
    assert r["ioreq.destroy_rc"] == "0", r
    assert r["ioreq.bufioreq"] == "-1 Invalid argument", r  # no buffered IOREQs on Arm
    assert r["p1.destroyed"] == "1", r


DOMU_HELLO = """
result kernel "$(uname -r)"
result hello world
result virtio_disks "$(ls /sys/block | grep -c '^vd')"
"""


def test_domu_boots_and_reports(xen_run: Runner) -> None:
    """A domU without disks boots, runs its script and its results reach dom0."""
    dom0 = """
domu_run d0 hello 300
rc=$?
xl list | sed 's/^/xl-list| /'
exit $rc
"""
    result = xen_run(dom0, {"hello": DOMU_HELLO}, backend=None)
    r = result.results
    assert r["d0.exit"] == "0", r
    assert r["d0.hello"] == "world", r
    assert r["d0.virtio_disks"] == "0", r


# Answer libxl's wait for InitWait by hand (no real backend), so the domU starts and shows
# its device tree; the first xenstore dump is taken while libxl waits.
DOM0_CONTRACT = r"""
make_disk /tmp/a.img 64
domu_config n1 main "$(vdisk xvda /tmp/a.img)"
t0=$(now)
domu_create n1
result nobackend.create_rc $?
result nobackend.create_s "$(elapsed "$t0")"
grep -i -E 'virtio|timed out|state' /tmp/xl-create-n1.log | sed 's/^/xl-n1| /' | tail -n 40

DOMU_EXTRA="quiet rigs.nomodules=1"
domu_config c1 dt "$(vdisk xvda /tmp/a.img)" "$(vdisk xvdb /tmp/a.img ro)"
(
    n=0
    while [ "$n" -lt 600 ]; do
        for st in $(xenstore-ls -f /local/domain/0/backend/virtio_disk 2>/dev/null \
                | sed -n 's|^\(/local/domain/0/backend/virtio_disk/[0-9]*/[0-9]*\)/state = "1"$|\1|p'); do
            if [ ! -f /tmp/xs-first.txt ]; then
                xenstore-ls -fp /local/domain/0/backend/virtio_disk >/tmp/xs-first.txt
                dom=$(echo "$st" | cut -d/ -f7)
                xenstore-ls -fp "/local/domain/$dom/device" >>/tmp/xs-first.txt 2>&1
                xenstore-ls -fp "/libxl/$dom" >>/tmp/xs-first.txt 2>&1
            fi
            xenstore-write "$st/state" 2
        done
        n=$((n + 1))
        usleep 100000
    done
) &
fake=$!
domu_create c1
result fake.create_rc $?
grep -i -E 'virtio|mmio' /tmp/xl-create-c1.log | sed 's/^/xl-c1| /' | tail -n 40
domu_wait c1 300
result c1.exit $?
domu_console c1
domu_results c1
sed 's/^/xs-first| /' /tmp/xs-first.txt
xs_dump /local/domain/0/backend/virtio_disk
kill "$fake"
xl destroy c1
exit 0
"""

DOMU_DT = r"""
count=0
for compat in $(find /sys/firmware/devicetree/base/ -name compatible); do
    grep -q 'virtio,mmio' "$compat" || continue
    node=$(dirname "$compat")
    name=$(basename "$node")
    count=$((count + 1))
    result "dt.node$count" "$name"
    for prop in "$node"/*; do
        result "dt.$name.$(basename "$prop")" "$(xxd -p "$prop" | tr -d '\n')"
    done
    result "dt.$name.compatible_str" "$(tr '\0' ' ' <"$compat")"
done
result dt.count "$count"
"""


def test_toolstack_virtio_disk_contract(xen_run: Runner) -> None:
    """xl create of a virtio disk waits for the backend's InitWait (and fails without one);
    with a hand-made InitWait the domU boots with virtio,mmio nodes in its device tree."""
    result = xen_run(DOM0_CONTRACT, {"dt": DOMU_DT}, backend=None)
    r = result.results
    assert r["nobackend.create_rc"] != "0", r
    assert float(r["nobackend.create_s"]) >= 9.0, r
    assert r["fake.create_rc"] == "0", r
    assert r["c1.exit"] == "0", r
    assert r["c1.dt.count"] == "2", r
    node = r["c1.dt.node1"]
    assert r[f"c1.dt.{node}.compatible_str"].strip() == "virtio,mmio", r
    assert "xs-first| /local/domain/0/backend/virtio_disk/" in result.console
