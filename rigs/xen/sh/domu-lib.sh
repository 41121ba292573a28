# rigs.xen domU test library, sourced at the top of every /tests/<name>.sh (busybox sh).
# "@@GUEST <key> <value>" lines reach dom0 through the console log, where domu_results turns
# them into "@@RESULT <domU name>.<key> <value>".
result() { _k=$1; shift; echo "@@GUEST $_k $*"; }
say() { echo "## $*"; }
fail() { echo "@@GUEST fail $*"; exit 1; }
