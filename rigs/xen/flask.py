"""The Flask (XSM) policy built into the rig's hypervisor: Xen's own example policy
(``tools/flask/policy`` of the xen source package the hypervisor is built from) with
pyvirtio's driver domain module, ``pyvirtio_domd.te`` beside this file, added.

Debian's configuration has Flask compiled in, without a built-in policy, and SILO as the
default XSM: the rig adds ``CONFIG_XSM_FLASK_POLICY=y`` (the policy is compiled with the
host's ``checkpolicy`` during the hypervisor build, :mod:`rigs.xen.hypervisor`), so tests
that boot Xen with ``xsm=flask`` get this policy, enforcing, from the first instruction on;
every other test keeps SILO. (Loading a policy later from dom0, ``flask=late``, leaves the
event channels dom0 made before it with dom0's domain label, which no policy may let it use.)
"""

from __future__ import annotations

from pathlib import Path

from rigs import RigError

MODULE = Path(__file__).with_name("pyvirtio_domd.te")
MODULE_NAME = MODULE.stem


def add_policy_module(xen_tree: Path) -> None:
    """Put :data:`MODULE` into the example policy of the unpacked xen source ``xen_tree``."""
    modules = xen_tree / "tools" / "flask" / "policy" / "modules"
    if not (modules / "modules.conf").is_file():
        raise RigError(f"{xen_tree} has no tools/flask/policy/modules/modules.conf")
    (modules / MODULE.name).write_text(MODULE.read_text())
    with (modules / "modules.conf").open("a") as conf:
        conf.write(f"\n# pyvirtio's driver domain (rigs/xen/{MODULE.name})\n{MODULE_NAME} = on\n")
