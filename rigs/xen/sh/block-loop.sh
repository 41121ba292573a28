#!/bin/sh
# rigs.xen hotplug script for PV block disks (busybox sh; Xen's own "block" script needs bash):
# "disk = [ '..., backendtype=phy, script=/etc/rigs/block-loop, target=IMAGE' ]". libxl (or
# "xl devd" in a driver domain) runs it with "add" or "remove" and XENBUS_PATH set to the vbd's
# backend directory. A regular file gets a loop device; blkback opens the block device named
# by physical-device (major:minor in hex), as with Xen's script.
dir=$XENBUS_PATH
case "$1" in
add)
    target=$(xenstore-read "$dir/params") || exit 1
    if [ -b "$target" ]; then
        dev=$target
    else
        dev=$(losetup -f) && losetup "$dev" "$target" || exit 1
    fi
    xenstore-write "$dir/physical-device" "$(stat -L -c '%t:%T' "$dev")" \
        "$dir/physical-device-path" "$dev" "$dir/hotplug-status" connected
    ;;
remove)
    dev=$(xenstore-read "$dir/physical-device-path" 2>/dev/null)
    case "$dev" in /dev/loop*) losetup -d "$dev" ;; esac
    ;;
esac
exit 0
