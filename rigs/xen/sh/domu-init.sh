#!/bin/sh
# rigs.xen domU /init: load virtio-mmio/virtio-blk (unless rigs.nomodules=1, or the kernel
# has no module support and so has them built in), wait for rigs.disks=N disks, run
# /tests/<rigs.script>.sh, print "@@GUEST-EXIT <status>" on hvc0 and power off.
export PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root TERM=dumb
/bin/busybox --install -s
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t tmpfs -o mode=1777 tmpfs /tmp
ln -sfn /proc/self/fd /dev/fd
ln -sfn /proc/mounts /etc/mtab

script=main disks=0 wait=60 modules=1
for arg in $(cat /proc/cmdline); do
    case "$arg" in
        rigs.nomodules=1) modules=0 ;;
        rigs.script=*) script=${arg#*=} ;;
        rigs.disks=*) disks=${arg#*=} ;;
        rigs.wait=*) wait=${arg#*=} ;;
    esac
done

finish() {
    echo "@@GUEST-EXIT $1"
    sync
    poweroff -f
    sleep 1000000
}

echo "@@GUEST-INIT up after $(cut -d' ' -f1 /proc/uptime)s"
# rigs.nomodules=1: no virtio drivers (to look at the device tree without touching the device).
[ "$modules" = 1 ] || disks=0
# A kernel without module support (no /proc/modules, e.g. rigs.xen.grant_kernel's) has its
# drivers built in: the archive's modules (Debian's kernel) are not for it.
if [ "$modules" = 1 ] && [ ! -e /proc/modules ]; then
    echo "@@GUEST-INIT kernel $(uname -r) has no module support: drivers are built in"
    modules=builtin
fi
[ "$modules" = 1 ] && while read -r mod; do
    insmod "/lib/modules/rigs/$mod" || echo "@@GUEST-INIT insmod $mod failed"
done < /etc/rigs/modules

ticks=0
while :; do
    found=$(ls -d /sys/block/vd* 2>/dev/null | wc -l)
    [ "$found" -ge "$disks" ] && break
    ticks=$((ticks + 1))
    if [ "$ticks" -gt $((wait * 10)) ]; then
        echo "@@GUEST-INIT only $found of $disks virtio disks appeared within ${wait}s"
        ls /sys/bus/virtio/devices/ /sys/block/
        dmesg | grep -i virtio | tail -n 20
        finish 253
    fi
    usleep 100000
done

cd /tmp
if [ -f "/tests/$script.sh" ]; then
    sh "/tests/$script.sh"
    rc=$?
else
    echo "@@GUEST-INIT no /tests/$script.sh"
    rc=127
fi
finish "$rc"
