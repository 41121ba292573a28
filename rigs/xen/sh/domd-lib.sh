# rigs.xen driver domain library, sourced (after dom0-lib.sh) by every snippet DomD runs
# (domd-init.sh). Results go out as "@@GUEST key value" on DomD's console, like a domU's.
result() { _k=$1; shift; echo "@@GUEST $_k $*"; }
fail() { echo "@@GUEST fail $*"; exit 1; }
# Each snippet runs in a subshell: the backend's pid lives in a file (see backend_start).
BACKEND_PID=$(cat "$BACKEND_PID_FILE" 2>/dev/null)
