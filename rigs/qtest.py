"""QEMU 7.2's qtests: ``qos-test`` and a qtest-capable ``qemu-system-x86_64``, built from Debian
12's ``qemu`` source package (with Debian's patches applied by ``dpkg-source -x``).

Debian's packaged ``qemu-system-x86_64`` cannot run qtests, and ``qos-test`` is not packaged, so
both are built here: configured for the x86_64 system emulator only, with the tools enabled (the
vhost-user-blk tests are only compiled with them) and every optional feature off, and only those
two targets built with ninja. KVM stands in for TCG as the required accelerator (it builds much
faster); the tests use the qtest accelerator anyway.

``-M pc`` needs firmware even under qtest. The dfsg source has none, so the files are taken from
Debian's ``seabios``, ``qemu-system-data`` and ``ipxe-qemu`` packages (downloaded, not the host's
installed ones) into ``share/qemu/``, where the binary looks relative to its own ``bin/``.

Cache layout under ``<cache>``: ``qtest-apt/`` (private apt lists with deb-src, downloaded and
unpacked .debs), ``qtest-src/<version>/`` (the .dsc and its tarballs) and ``qtest-<version>/``
(``bin/qemu-system-x86_64``, ``bin/qos-test``, ``share/qemu/``, ``build.log``, ``build.json``).
A finished build is used as long as it is there and was built with the current
:data:`CONFIGURE` and :data:`BUILD_FORMAT`; a newer Debian upload does not rebuild it (remove
the directory for that). ``python -m rigs.qtest`` builds it and prints the paths.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from rigs import RigError
from rigs.cache import build_lock, cache_dir
from rigs.host import find_tool
from rigs.xen.apt import ForeignApt, newest_first, newest_source
from rigs.xen.crossbuild import run_logged
from rigs.xen.packages import Packages

SOURCE_PACKAGE = "qemu"
BUILD_FORMAT = 1  # bump to rebuild
CONFIGURE = (
    "--target-list=x86_64-softmmu",
    "--without-default-features",
    "--disable-docs",
    "--disable-user",
    "--enable-kvm",
    "--disable-tcg",
    "--enable-tools",
    "--enable-vhost-user",
    "--enable-vhost-user-blk-server",
    "--enable-fdt=system",  # the pc machines need no device tree, but microvm (built in) does
    "--disable-debug-info",
    "--disable-werror",
    "--disable-install-blobs",
    "--with-git-submodules=ignore",
)
TARGETS = ("qemu-system-x86_64", "tests/qtest/qos-test")
# share/qemu file -> (Debian package, its path in the package): what -M pc loads (-trace load_file)
FIRMWARE = {
    "bios-256k.bin": ("seabios", "usr/share/seabios/bios-256k.bin"),
    "vgabios-stdvga.bin": ("seabios", "usr/share/seabios/vgabios-stdvga.bin"),
    "kvmvapic.bin": ("qemu-system-data", "usr/share/qemu/kvmvapic.bin"),
    "efi-e1000.rom": ("ipxe-qemu", "usr/lib/ipxe/qemu/efi-e1000.rom"),
}
TOOLS = ("dpkg-source", "patch", "xz", "meson", "ninja", "pkg-config", "cc")
# configure and ninja run with the system's Python (meson's) ahead of e.g. pyenv shims
BUILD_PATH = os.pathsep.join(["/usr/local/bin", "/usr/bin", "/bin"])


@dataclass(frozen=True)
class QtestRig:
    """A built ``qemu-system-x86_64`` + ``qos-test`` pair."""

    version: str  # the Debian source version
    root: Path

    @property
    def qemu(self) -> Path:
        """The system emulator, for ``QTEST_QEMU_BINARY``."""
        return self.root / "bin" / "qemu-system-x86_64"

    @property
    def qos_test(self) -> Path:
        """The qos-test program."""
        return self.root / "bin" / "qos-test"

    @property
    def datadir(self) -> Path:
        """Firmware the emulator finds relative to its own directory."""
        return self.root / "share" / "qemu"

    @property
    def build_log(self) -> Path:
        """The configure and ninja output."""
        return self.root / "build.log"

    def environment(self) -> dict[str, str]:
        """The variables qos-test needs besides any back-end binaries."""
        return {"QTEST_QEMU_BINARY": str(self.qemu)}


def _stamp() -> dict[str, object]:
    """What a build depends on besides the source version (see :func:`_usable`)."""
    return {"format": BUILD_FORMAT, "configure": list(CONFIGURE), "targets": list(TARGETS)}


def _usable(root: Path) -> QtestRig | None:
    """The build in ``root`` if it is complete and built the current way."""
    try:
        info = json.loads((root / "build.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(info, dict) or any(info.get(k) != v for k, v in _stamp().items()):
        return None
    rig = QtestRig(str(info.get("version")), root)
    if not (rig.qemu.is_file() and rig.qos_test.is_file()):
        return None
    if any(not (rig.datadir / name).is_file() for name in FIRMWARE):
        return None
    return rig


def cached() -> QtestRig | None:
    """The newest usable build in the cache, without asking apt."""
    found = {}
    for root in cache_dir().glob("qtest-*"):
        rig = _usable(root)
        if rig is not None:
            found[rig.version] = rig
    return found[newest_first(found)[0]] if found else None


def _dirname(version: str) -> str:
    """``qtest-<version>`` without the epoch (no ``:`` in the paths handed to QEMU)."""
    return "qtest-" + version.partition(":")[2] if ":" in version else "qtest-" + version


def host_apt() -> ForeignApt:
    """apt with private lists (deb-src included) under ``<cache>/qtest-apt``."""
    arch = subprocess.run(
        ["dpkg", "--print-architecture"], capture_output=True, text=True, check=False
    ).stdout.strip()
    root = cache_dir() / "qtest-apt"
    return ForeignApt(root, root / "debs", arch=arch or "amd64")


def source_version(apt: ForeignApt, into: Path) -> tuple[str, Path]:
    """The newest ``qemu`` source version whose files can be had: (version, its .dsc)."""
    version, _, dsc = newest_source(apt, SOURCE_PACKAGE, into, "*.dsc")
    return version, dsc


def _step(cmd: list[str], cwd: Path, log: Path, what: str) -> float:
    """:func:`run_logged`, with the time it took logged and returned."""
    start = time.monotonic()
    run_logged(cmd, cwd, log, what)
    took = time.monotonic() - start
    with log.open("a") as out:
        out.write(f"# {what}: {took:.0f} s\n")
    return took


def _firmware(apt: ForeignApt, version: str, into: Path) -> dict[str, str]:
    """Copy :data:`FIRMWARE` into ``into``; return the package versions used.
    ``qemu-system-data`` is pinned to the source version built."""
    packages = Packages(apt, cache_dir() / "qtest-apt" / "unpacked", {"qemu-system-data": version})
    used: dict[str, str] = {}
    into.mkdir(parents=True, exist_ok=True)
    for name, (package_name, path) in FIRMWARE.items():
        package = packages.need(package_name)
        found = package.root / path
        if not found.exists():
            raise RigError(f"{package.key} has no /{path}")
        shutil.copyfile(found.resolve(), into / name)  # some are symlinks within the package
        used[package.name] = package.version
    return used


def build(apt: ForeignApt, version: str, dsc: Path, out: Path) -> QtestRig:
    """Unpack ``dsc`` (``version``), configure, build :data:`TARGETS` and install them with
    their firmware into ``out``."""
    for tool in TOOLS:
        find_tool(tool)
    jobs = os.cpu_count() or 1
    failed_log = cache_dir() / "qtest-failed-build.log"
    with tempfile.TemporaryDirectory(dir=cache_dir(), prefix=".qtest-build-") as tmp:
        work = Path(tmp)
        log = work / "build.log"
        src = work / "src"
        env = ["env", f"PATH={BUILD_PATH}{os.pathsep}{os.environ.get('PATH', '')}"]
        objdir = src / "build"
        try:
            times = {
                "unpack": _step(["dpkg-source", "-x", str(dsc), str(src)], work, log, "unpack")
            }
            objdir.mkdir()
            times["configure"] = _step(
                [*env, "../configure", *CONFIGURE], objdir, log, "configure qemu"
            )
            times["ninja"] = _step(
                [*env, "ninja", f"-j{jobs}", *TARGETS], objdir, log, f"ninja {' '.join(TARGETS)}"
            )
        except RigError as err:  # the build tree goes, its log stays
            shutil.copyfile(log, failed_log)
            raise RigError(f"{err}\n(whole log: {failed_log})") from None
        failed_log.unlink(missing_ok=True)
        stage = work / "out"
        rig = QtestRig(version, stage)
        rig.qemu.parent.mkdir(parents=True)
        shutil.copy2(objdir / TARGETS[0], rig.qemu)
        shutil.copy2(objdir / TARGETS[1], rig.qos_test)
        packages = _firmware(apt, version, rig.datadir)
        shutil.copy2(log, rig.build_log)
        info = {
            **_stamp(),
            "version": version,
            "firmware_packages": packages,
            "seconds": {k: round(v) for k, v in times.items()},
            "jobs": jobs,
        }
        (stage / "build.json").write_text(json.dumps(info, indent=1) + "\n")
        shutil.rmtree(out, ignore_errors=True)
        stage.rename(out)
        out.chmod(0o755)
    built = _usable(out)
    if built is None:
        raise RigError(f"the qtest build in {out} is incomplete")
    return built


def ensure_qtest(apt: ForeignApt | None = None) -> QtestRig:
    """The cached build, or build one from the newest Debian ``qemu`` source (tens of minutes
    on two cores). Concurrent callers wait for one build."""
    found = cached()
    if found is not None:
        return found
    with build_lock("qtest"):
        found = cached()  # another process may have built it while we waited
        if found is not None:
            return found
        apt = apt or host_apt()
        apt.update()
        version, dsc = source_version(apt, cache_dir() / "qtest-src")
        return build(apt, version, dsc, cache_dir() / _dirname(version))


if __name__ == "__main__":
    start = time.monotonic()
    rig = ensure_qtest()
    print(f"qemu {rig.version} ({time.monotonic() - start:.0f} s)")
    print(f"QTEST_QEMU_BINARY={rig.qemu}")
    print(f"qos-test: {rig.qos_test}")
