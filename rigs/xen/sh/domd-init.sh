#!/bin/sh
# rigs.xen driver domain (DomD) /init. DomD boots from a copy of dom0's root (domd_start in
# dom0-lib.sh makes it), loads the Xen device drivers a backend needs and then carries out
# shell snippets dom0 hands it through xenstore (domd_sh): data/rigs-cmd holds the snippet,
# data/rigs-seq its number; the answer is data/rigs-rc-<seq> (the snippet's status). Output
# goes to hvc0, whose log dom0 reads; "@@GUEST key value" lines are results (domu_results).
export PATH=/usr/lib/xen-4.17/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root TERM=dumb
/bin/busybox --install -s
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t tmpfs -o mode=1777 tmpfs /tmp
mount -t tmpfs -o mode=755 tmpfs /run
mkdir -p /run/xen /run/lock
ln -sfn /proc/self/fd /dev/fd
ln -sfn /proc/mounts /etc/mtab
[ -x /usr/sbin/ldconfig ] && /usr/sbin/ldconfig

finish() {
    echo "@@GUEST-EXIT $1"
    sync
    poweroff -f
    sleep 1000000
}

echo "@@GUEST-INIT DomD up after $(cut -d' ' -f1 /proc/uptime)s, kernel $(uname -r)"
if [ -e /proc/modules ]; then
    # Outside dom0 Linux restricts privcmd to the domain in xenstore's "target" (which libxl
    # writes for stub domains only) unless it is loaded unrestricted; Xen's XSM policy is
    # what decides what the driver domain may do.
    while read -r mod; do
        case "$mod" in xen-privcmd.ko) args=unrestricted=1 ;; *) args= ;; esac
        insmod "/lib/modules/rigs/$mod" $args || echo "@@GUEST-INIT insmod $mod failed"
    done < /etc/rigs/modules
else
    echo "@@GUEST-INIT kernel $(uname -r) has no module support: drivers are built in"
fi
mount -t xenfs xenfs /proc/xen 2>/dev/null
for dev in privcmd evtchn gntdev xenbus; do
    [ -e "/dev/xen/$dev" ] || echo "@@GUEST-INIT no /dev/xen/$dev"
done
xenstore-read domid >/dev/null 2>&1 || { echo "@@GUEST-INIT xenstore does not answer"; finish 250; }
echo "@@GUEST domid $(xenstore-read domid)"
echo "@@GUEST-READY"

cd /tmp
last=0
while :; do
    seq=$(xenstore-read data/rigs-seq 2>/dev/null)
    if [ -n "$seq" ] && [ "$seq" != "$last" ]; then
        last=$seq
        xenstore-read data/rigs-cmd >/tmp/cmd.sh 2>/dev/null
        echo "## domd: snippet $seq"
        (. /etc/rigs/lib.sh; . /etc/rigs/domd-lib.sh; . /tmp/cmd.sh)
        rc=$?
        xenstore-write "data/rigs-rc-$seq" "$rc"
        [ -f /tmp/domd-poweroff ] && finish 0
        continue
    fi
    # Wait for the next snippet without spending the domain's CPU (benchmarks measure it):
    # a watch fires once when set and once per change; the timeout covers a change that came
    # between the read above and the watch.
    timeout 5 xenstore-watch -n 2 data/rigs-seq >/dev/null 2>&1
done
