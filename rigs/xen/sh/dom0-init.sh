#!/bin/sh
# rigs.xen dom0 /init: mount, load the xen modules, start xenstored, xen-init-dom0 and
# xenconsoled, then run /test.sh, print "@@EXIT <status>" and power the machine off.
export PATH=/usr/lib/xen-4.17/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root TERM=dumb
/bin/busybox --install -s
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts /dev/shm
# xenconsoled gives each guest a pty: without devpts "xl create" fails ("console tty: timed out").
mount -t devpts -o gid=5,mode=620,ptmxmode=666 devpts /dev/pts
mount -t tmpfs -o mode=1777 tmpfs /tmp
mount -t tmpfs -o mode=755 tmpfs /run
mkdir -p /run/xen /run/xenstored /var/lib/xen /var/lib/xenstored /var/log/xen/console /run/lock
ln -sfn /proc/self/fd /dev/fd
ln -sfn /proc/mounts /etc/mtab

finish() {
    echo "@@EXIT $1"
    sync
    poweroff -f
    sleep 1000000
}
uptime_s() { cut -d' ' -f1 /proc/uptime; }

[ -x /usr/sbin/ldconfig ] && /usr/sbin/ldconfig

while read -r mod; do
    insmod "/lib/modules/rigs/$mod" || echo "@@INIT insmod $mod failed"
done < /etc/rigs/modules
mount -t xenfs xenfs /proc/xen || { echo "@@INIT cannot mount xenfs"; finish 250; }

xenstored --pid-file /run/xenstored.pid || { echo "@@INIT xenstored failed"; finish 250; }
ticks=0
until xenstore-ls / >/dev/null 2>&1; do
    ticks=$((ticks + 1))
    [ "$ticks" -gt 200 ] && { echo "@@INIT xenstored does not answer"; finish 250; }
    usleep 50000
done
xen-init-dom0 || { echo "@@INIT xen-init-dom0 failed"; finish 250; }
xenconsoled --pid-file=/run/xenconsoled.pid --log=guest --log-dir=/var/log/xen/console \
    || { echo "@@INIT xenconsoled failed"; finish 250; }
echo "@@INIT dom0 ready after $(uptime_s)s"

cd /tmp
if [ -f /test.sh ]; then
    sh /test.sh
    rc=$?
else
    echo "@@INIT no /test.sh in the initramfs"
    rc=127
fi
finish "$rc"
