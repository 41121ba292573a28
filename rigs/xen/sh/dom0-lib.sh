# rigs.xen dom0 test library, sourced at the top of /test.sh (busybox sh).
#
# Output protocol (serial console, parsed by rigs.xen.qemu): "@@RESULT <key> <value>" lines;
# /init prints "@@EXIT <status of /test.sh>". "## ..." lines are commentary, "name| ..." lines
# are copies of logs (the backend's, a domU console's, xenstore dumps).
export PYTHONPATH=/opt/pyvirtio
RIGS_BACKEND=${RIGS_BACKEND-$(cat /etc/rigs/backend 2>/dev/null)}
RIGS_BACKEND_READY=${RIGS_BACKEND_READY-$(cat /etc/rigs/backend-ready 2>/dev/null)}
CONSOLE_DIR=/var/log/xen/console
DOMU_KERNEL=${DOMU_KERNEL:-/domu/Image}
DOMU_INITRD=/domu/initrd
DOMU_MEMORY=${DOMU_MEMORY:-256}
DOMU_EXTRA=${DOMU_EXTRA:-quiet}
BACKEND_PID=
BACKEND_LOG=/tmp/backend.log
BACKEND_PID_FILE=/run/rigs-backend.pid

result() { _k=$1; shift; echo "@@RESULT $_k $*"; }
say() { echo "## $*"; }
fail() { echo "@@RESULT fail $*"; exit 1; }
now() { cut -d' ' -f1 /proc/uptime; }
elapsed() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }

# --- the backend daemon ---------------------------------------------------------------------
# backend_start [ARGS...]: start "$RIGS_BACKEND ARGS" in the background (log: $BACKEND_LOG);
# wait until its log matches $RIGS_BACKEND_READY (or 3 s if that is empty). Fails the test if
# the process exits or is not ready within 120 s.
backend_start() {
    [ -n "$RIGS_BACKEND" ] || fail "no backend command"
    say "backend: $RIGS_BACKEND $*"
    _t0=$(now)
    sh -c "exec $RIGS_BACKEND $*" >>"$BACKEND_LOG" 2>&1 &
    BACKEND_PID=$!
    echo "$BACKEND_PID" >"$BACKEND_PID_FILE"
    _ticks=0
    while :; do
        if ! kill -0 "$BACKEND_PID" 2>/dev/null; then
            wait "$BACKEND_PID"
            _rc=$?
            backend_log
            fail "backend exited with status $_rc while starting"
        fi
        if [ -n "$RIGS_BACKEND_READY" ]; then
            grep -q -- "$RIGS_BACKEND_READY" "$BACKEND_LOG" && break
        elif [ "$_ticks" -ge 30 ]; then
            break
        fi
        _ticks=$((_ticks + 1))
        [ "$_ticks" -gt 1200 ] && { backend_log; fail "backend not ready within 120 s"; }
        usleep 100000
    done
    result backend.start_s "$(elapsed "$_t0")"
}

# backend_alive: true while the daemon runs.
backend_alive() { [ -n "$BACKEND_PID" ] && kill -0 "$BACKEND_PID" 2>/dev/null; }

# backend_stop [TIMEOUT=30]: SIGTERM, then SIGKILL after TIMEOUT s; prints the exit status.
backend_stop() {
    [ -n "$BACKEND_PID" ] || { echo 255; return; }
    kill -TERM "$BACKEND_PID" 2>/dev/null
    _ticks=0
    while kill -0 "$BACKEND_PID" 2>/dev/null; do
        _ticks=$((_ticks + 1))
        if [ "$_ticks" -gt $((${1:-30} * 10)) ]; then
            say "backend ignored SIGTERM, killing it"
            kill -KILL "$BACKEND_PID" 2>/dev/null
        fi
        usleep 100000
    done
    wait "$BACKEND_PID"
    echo $?
    BACKEND_PID=
}

# backend_log: copy the daemon's log to the console.
backend_log() { [ -f "$BACKEND_LOG" ] && sed 's/^/backend| /' "$BACKEND_LOG"; }

# --- disks and domUs ------------------------------------------------------------------------
# make_disk PATH MIB: a zero-filled (sparse) raw image in dom0's RAM.
make_disk() { rm -f "$1"; truncate -s "${2}M" "$1"; }

# pvdisk VDEV PATH [BACKEND]: an xl disk entry for Xen's PV block driver (blkback in the backend
# domain's kernel, blkfront in the domU's), PATH a block device or an image (a loop device).
pvdisk() {
    echo "'format=raw, vdev=$1, access=rw, backendtype=phy, script=/etc/rigs/block-loop, ${3:+backend=$3, }target=$2'"
}

# vdisk VDEV PATH [rw|ro] [BACKEND]: one entry of an xl "disk = [...]" list (a virtio disk that
# the standalone backend serves; in domain BACKEND, by name, instead of dom0 if given). xl
# takes everything after "target=" as the path, so it comes last.
vdisk() {
    echo "'format=raw, vdev=$1, access=${3:-rw}, backendtype=standalone, specification=virtio, ${4:+backend=$4, }target=$2'"
}

# domu_kernel NAME: boot the domUs configured from now on with /domu/NAME, a kernel the test
# added (XenTest.domu_kernels, e.g. Image-grants: rigs.xen.grant_kernel); Image is Debian's.
domu_kernel() {
    [ -f "/domu/$1" ] || fail "no domU kernel /domu/$1"
    DOMU_KERNEL=/domu/$1
    say "domU kernel: $DOMU_KERNEL"
}

# domu_config NAME SCRIPT [DISKSPEC...]: write /etc/xen/NAME.cfg; the domU runs
# /tests/SCRIPT.sh after its disks appeared.
domu_config() {
    _name=$1 _script=$2
    shift 2
    _disks= _blocks=0
    for _d in "$@"; do
        _disks="${_disks:+$_disks, }$_d"
        case "$_d" in *.pyvirtio\'*) ;; *) _blocks=$((_blocks + 1)) ;; esac  # not a disk
    done
    mkdir -p /etc/xen
    cat >"/etc/xen/$_name.cfg" <<CFG
name = "$_name"
kernel = "$DOMU_KERNEL"
ramdisk = "$DOMU_INITRD"
extra = "console=hvc0 rdinit=/init rigs.script=$_script rigs.disks=$_blocks $DOMU_EXTRA"
memory = $DOMU_MEMORY
vcpus = 1
on_crash = "preserve"
disk = [ $_disks ]
CFG
}

# domu_create NAME: xl -vvv create /etc/xen/NAME.cfg (log: /tmp/xl-create-NAME.log);
# returns xl's status, and copies the log to the console when it failed.
domu_create() {
    rm -f "$CONSOLE_DIR/guest-$1.log"
    _t0=$(now)
    xl -vvv create "/etc/xen/$1.cfg" >"/tmp/xl-create-$1.log" 2>&1
    _rc=$?
    result "$1.create_s" "$(elapsed "$_t0")"
    if [ "$_rc" -ne 0 ]; then
        sed "s/^/xl[$1]| /" "/tmp/xl-create-$1.log" | tail -n 60
    fi
    return "$_rc"
}

# domu_exists NAME: true while xl knows the domain.
domu_exists() { xl domid "$1" >/dev/null 2>&1; }

# domu_wait NAME [TIMEOUT=300]: wait for the domU's "@@GUEST-EXIT <status>" (then for the
# domain to go away) and return that status; 124 on timeout, 125 if it vanished without one.
domu_wait() {
    _log="$CONSOLE_DIR/guest-$1.log"
    _ticks=0
    _limit=$((${2:-300} * 10))
    while ! grep -q '@@GUEST-EXIT' "$_log" 2>/dev/null; do
        _ticks=$((_ticks + 1))
        if [ $((_ticks % 20)) -eq 0 ] && ! domu_exists "$1"; then
            sleep 1
            grep -q '@@GUEST-EXIT' "$_log" 2>/dev/null || return 125
            break
        fi
        [ "$_ticks" -gt "$_limit" ] && { say "domU $1: no @@GUEST-EXIT in ${2:-300} s"; return 124; }
        usleep 100000
    done
    _ticks=0
    while domu_exists "$1" && [ "$_ticks" -lt 30 ]; do
        _ticks=$((_ticks + 1))
        sleep 1
    done
    _rc=$(tr -d '\r' <"$_log" | sed -n 's/.*@@GUEST-EXIT \(-\{0,1\}[0-9]*\).*/\1/p' | tail -n 1)
    return "${_rc:-125}"
}

# domu_console NAME: copy the domU's console log to the console ("NAME| " prefix).
domu_console() { tr -d '\r' <"$CONSOLE_DIR/guest-$1.log" 2>/dev/null | sed "s/^/$1| /"; }

# domu_results NAME [PREFIX=NAME]: the domU's "@@GUEST key value" as "@@RESULT PREFIX.key value".
domu_results() {
    tr -d '\r' <"$CONSOLE_DIR/guest-$1.log" 2>/dev/null \
        | sed -n "s/^.*@@GUEST \([^ ]*\) *\(.*\)\$/@@RESULT ${2:-$1}.\1 \2/p"
}

# domu_destroy NAME: xl destroy, if it still exists.
domu_destroy() { domu_exists "$1" && xl destroy "$1"; }

# domu_run NAME SCRIPT TIMEOUT [DISKSPEC...]: config, create, wait, copy console and results;
# returns the domU script's status (or xl create's, or 124/125, see domu_wait).
domu_run() {
    _n=$1 _s=$2 _tmo=$3
    shift 3
    domu_config "$_n" "$_s" "$@"
    _t1=$(now)
    domu_create "$_n" || return $?
    domu_wait "$_n" "$_tmo"
    _st=$?
    result "$_n.run_s" "$(elapsed "$_t1")"
    domu_console "$_n"
    domu_results "$_n"
    result "$_n.exit" "$_st"
    domu_destroy "$_n" >/dev/null 2>&1
    return "$_st"
}

# xs_dump [PATH=/]: xenstore-ls -f PATH, copied to the console ("xs| " prefix).
xs_dump() { xenstore-ls -f "${1:-/}" 2>&1 | sed 's/^/xs| /'; }

# --- a driver domain (DomD) -----------------------------------------------------------------
DOMD_KERNEL=${DOMD_KERNEL:-/domu/Image}
DOMD_MEMORY=${DOMD_MEMORY:-384}
DOMD_SEQ=0

# domd_image: /tmp/domd.cpio, DomD's initramfs: dom0's root file system without the domU
# kernels and images (/domu) and without anything mounted (so files a test wrote under /etc
# before are in it). Made once per boot.
domd_image() {
    [ -f /tmp/domd.cpio ] && return 0
    (cd / && find . -xdev ! -path './domu' ! -path './domu/*' | cpio -o -H newc >/tmp/domd.cpio 2>/dev/null) \
        || fail "cannot make DomD's initramfs"
    result domd.initrd_bytes "$(wc -c </tmp/domd.cpio)"
}

# domd_config NAME [XL LINES...]: /etc/xen/NAME.cfg for a driver domain (driver_domain = 1)
# that boots $DOMD_KERNEL with domd_image and /etc/rigs/domd-init.sh; more xl lines (e.g.
# seclabel = "...") are appended. (xen_privcmd.unrestricted=1 is for a kernel with privcmd
# built in, e.g. rigs.xen.domd_kernel's; domd-init.sh passes it to a module.)
domd_config() {
    _name=$1
    shift
    mkdir -p /etc/xen
    cat >"/etc/xen/$_name.cfg" <<CFG
name = "$_name"
kernel = "$DOMD_KERNEL"
ramdisk = "/tmp/domd.cpio"
extra = "console=hvc0 rdinit=/etc/rigs/domd-init.sh quiet xen_privcmd.unrestricted=1"
memory = $DOMD_MEMORY
vcpus = 1
driver_domain = 1
on_crash = "preserve"
CFG
    for _line in "$@"; do echo "$_line" >>"/etc/xen/$_name.cfg"; done
}

# domd_start NAME [XL LINES...]: create the driver domain NAME and wait (300 s) until it takes
# snippets (domd_sh); returns xl create's status or 124.
domd_start() {
    _name=$1
    domd_image
    domd_config "$@"
    domu_create "$_name" || return $?
    _ticks=0
    until grep -q '@@GUEST-READY' "$CONSOLE_DIR/guest-$_name.log" 2>/dev/null; do
        _ticks=$((_ticks + 1))
        if [ "$_ticks" -gt 3000 ] || ! domu_exists "$_name"; then
            domu_console "$_name"
            return 124
        fi
        usleep 100000
    done
    result "$_name.domid" "$(xl domid "$_name")"
}

# domd_sh NAME SNIPPET [TIMEOUT=600]: run SNIPPET (busybox sh, with dom0-lib.sh and
# domd-lib.sh sourced, in a subshell) in driver domain NAME; returns its status (124: no
# answer in time).
domd_sh() {
    _id=$(xl domid "$1" 2>/dev/null) || return 126
    DOMD_SEQ=$((DOMD_SEQ + 1))
    _dir=/local/domain/$_id/data
    xenstore-write "$_dir/rigs-cmd" "$2" "$_dir/rigs-seq" "$DOMD_SEQ" || return 126
    _ticks=0
    _limit=$((${3:-600} * 10))
    until _rc=$(xenstore-read "$_dir/rigs-rc-$DOMD_SEQ" 2>/dev/null); do
        _ticks=$((_ticks + 1))
        [ "$_ticks" -gt "$_limit" ] && { say "DomD $1: snippet $DOMD_SEQ gave no answer"; return 124; }
        usleep 50000
    done
    return "$_rc"
}

# --- Flask ----------------------------------------------------------------------------------
# flask_mode: the hypervisor's XSM as a result (flask.mode: Enforcing or Permissive with
# "xsm=flask" on Xen's command line, which uses the policy built into the rig's hypervisor,
# rigs/xen/flask.py; otherwise xl's answer that Flask is off).
flask_mode() { result flask.mode "$(xl getenforce 2>&1 | head -n 1)"; }
