#!/usr/bin/env python3
"""Stand in for qemu-storage-daemon: run ``pyvirtio blk`` for each vhost-user-blk export.

QEMU's qtests start their vhost-user-blk back-end as ``$QTEST_QEMU_STORAGE_DAEMON_BINARY``
with qemu-storage-daemon's arguments, for example (QEMU 7.2's vhost-user-blk-test)::

    --blockdev driver=file,node-name=disk0,filename=qtest.AbC123
    --export type=vhost-user-blk,id=disk0,addr.type=fd,addr.str=5,node-name=disk0,writable=on,num-queues=1

This program translates them into ``python -m pyvirtio blk`` command lines (``--fd N`` for an
inherited listening socket, ``--socket-path P`` for ``addr.type=unix``). One export: it execs
pyvirtio, so the caller's SIGTERM reaches it directly. Several: it starts one pyvirtio per
export, passes SIGTERM/SIGINT on, and exits 0 only if every one of them exited 0 after that.

Only what it can translate faithfully is accepted; any other option, key or value is an error
(exit status 2 with a message), never ignored. Like qemu-storage-daemon, an export is read-only
unless ``writable=on``. pyvirtio is given ``--discard-segments 1``: qemu-storage-daemon's
max_discard_seg and max_write_zeroes_seg, which the qtests rely on.

The interpreter is ``<repo>/.venv/bin/python`` if it exists, else the one running this file;
``<repo>/src`` goes first on PYTHONPATH. With ``PYVIRTIO_QSD_LOG_DIR`` set, this program's own
messages are appended to ``<dir>/wrapper.log`` (and written to stderr) and each pyvirtio's
stderr goes to ``<dir>/pyvirtio-<wrapper pid>-<export id>.log``.
"""

from __future__ import annotations

import contextlib
import os
import signal
import stat
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

REPO_ROOT = Path(__file__).resolve().parents[2]
LOG_DIR_ENV = "PYVIRTIO_QSD_LOG_DIR"
DISCARD_SEGMENTS = 1  # qemu-storage-daemon's vhost-user-blk export allows one segment

_TRUE = ("on", "yes", "true", "y")
_FALSE = ("off", "no", "false", "n")


class UsageError(Exception):
    """Arguments this wrapper cannot translate."""


def log(message: str) -> None:
    """A line on stderr and, with PYVIRTIO_QSD_LOG_DIR, in its wrapper.log."""
    line = f"qsd-wrapper[{os.getpid()}]: {message}"
    print(line, file=sys.stderr, flush=True)
    log_dir = os.environ.get(LOG_DIR_ENV)
    if log_dir:
        stamp = time.strftime("%H:%M:%S")
        with (Path(log_dir) / "wrapper.log").open("a") as out:
            out.write(f"{stamp} {line}\n")


def die(message: str) -> NoReturn:
    """Report arguments that cannot be translated; exit status 2."""
    log(f"error: {message}")
    sys.exit(2)


def parse_options(text: str) -> dict[str, str]:
    """QEMU's ``key=value,key=value`` syntax (``,,`` is a literal comma)."""
    if text.startswith("{"):
        raise UsageError(f"JSON option syntax is not supported: {text!r}")
    items: list[str] = []
    current = ""
    i = 0
    while i < len(text):
        if text[i] == ",":
            if text[i + 1 : i + 2] == ",":
                current += ","
                i += 2
                continue
            items.append(current)
            current = ""
        else:
            current += text[i]
        i += 1
    items.append(current)
    options: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UsageError(f"{item!r} is not key=value (in {text!r})")
        if key in options:
            raise UsageError(f"{key} given twice (in {text!r})")
        options[key] = value
    return options


def boolean(options: dict[str, str], key: str, default: bool) -> bool:
    """An on/off option."""
    value = options.pop(key, None)
    if value is None:
        return default
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise UsageError(f"{key}={value!r} is not on or off")


def integer(options: dict[str, str], key: str) -> int | None:
    """A non-negative integer option, or None if absent."""
    value = options.pop(key, None)
    if value is None:
        return None
    if not value.isdigit():
        raise UsageError(f"{key}={value!r} is not a non-negative integer")
    return int(value)


def required(options: dict[str, str], key: str, what: str) -> str:
    """An option that must be present and not empty."""
    value = options.pop(key, "")
    if not value:
        raise UsageError(f"{what} needs {key}=")
    return value


def no_more(options: dict[str, str], what: str) -> None:
    """Every key was used; anything left is not understood."""
    if options:
        unknown = ", ".join(f"{k}={v}" for k, v in options.items())
        raise UsageError(f"{what}: unsupported option(s) {unknown}")


@dataclass(frozen=True)
class Blockdev:
    """``--blockdev driver=file``: a raw image file."""

    node_name: str
    filename: str
    read_only: bool


@dataclass(frozen=True)
class Export:
    """``--export type=vhost-user-blk``."""

    id: str
    node_name: str
    socket_path: str | None  # addr.type=unix
    fd: int | None  # addr.type=fd
    writable: bool
    num_queues: int | None
    logical_block_size: int | None


def parse_blockdev(text: str) -> Blockdev:
    """One ``--blockdev`` argument."""
    options = parse_options(text)
    driver = options.pop("driver", "")
    if driver != "file":
        raise UsageError(f"--blockdev driver={driver!r}: only driver=file is supported")
    blockdev = Blockdev(
        node_name=required(options, "node-name", "--blockdev"),
        filename=required(options, "filename", "--blockdev"),
        read_only=boolean(options, "read-only", False),
    )
    no_more(options, f"--blockdev {blockdev.node_name}")
    return blockdev


def parse_export(text: str) -> Export:
    """One ``--export`` argument."""
    options = parse_options(text)
    kind = options.pop("type", "")
    if kind != "vhost-user-blk":
        raise UsageError(f"--export type={kind!r}: only type=vhost-user-blk is supported")
    export_id = required(options, "id", "--export")
    what = f"--export {export_id}"
    node_name = required(options, "node-name", what)
    addr_type = required(options, "addr.type", what)
    socket_path: str | None = None
    fd: int | None = None
    if addr_type == "unix":
        socket_path = required(options, "addr.path", what)
    elif addr_type == "fd":
        fd_text = required(options, "addr.str", what)
        if not fd_text.isdigit():
            raise UsageError(f"{what}: addr.str={fd_text!r} is not a file descriptor number")
        fd = int(fd_text)
        try:
            mode = os.fstat(fd).st_mode
        except OSError as err:
            raise UsageError(f"{what}: addr.str={fd} is not an open descriptor ({err})") from None
        if not stat.S_ISSOCK(mode):
            raise UsageError(f"{what}: addr.str={fd} is not a socket")
    else:
        raise UsageError(f"{what}: addr.type={addr_type!r} (only unix and fd are supported)")
    export = Export(
        id=export_id,
        node_name=node_name,
        socket_path=socket_path,
        fd=fd,
        writable=boolean(options, "writable", False),
        num_queues=integer(options, "num-queues"),
        logical_block_size=integer(options, "logical-block-size"),
    )
    no_more(options, what)
    return export


def parse_args(argv: list[str]) -> tuple[dict[str, Blockdev], list[Export]]:
    """qemu-storage-daemon's command line: ``--blockdev`` and ``--export`` options only."""
    blockdevs: dict[str, Blockdev] = {}
    exports: list[Export] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        name, sep, value = arg.partition("=")
        if name not in ("--blockdev", "--export"):
            raise UsageError(f"unsupported argument {arg!r} (only --blockdev and --export)")
        if not sep:
            if i + 1 >= len(argv):
                raise UsageError(f"{name} needs a value")
            value = argv[i + 1]
            i += 1
        i += 1
        if name == "--blockdev":
            blockdev = parse_blockdev(value)
            if blockdev.node_name in blockdevs:
                raise UsageError(f"two blockdevs are named {blockdev.node_name!r}")
            blockdevs[blockdev.node_name] = blockdev
        else:
            exports.append(parse_export(value))
    if not exports:
        raise UsageError("no --export given")
    ids = [e.id for e in exports]
    if len(set(ids)) != len(ids):
        raise UsageError(f"export ids are not unique: {ids}")
    for export in exports:
        exported = blockdevs.get(export.node_name)
        if exported is None:
            raise UsageError(f"--export {export.id}: no blockdev named {export.node_name!r}")
        if export.writable and exported.read_only:
            raise UsageError(f"--export {export.id} is writable but its blockdev is read-only")
    return blockdevs, exports


def python() -> str:
    """The interpreter that runs pyvirtio."""
    venv = REPO_ROOT / ".venv" / "bin" / "python"
    return str(venv) if venv.exists() else sys.executable


def environment() -> dict[str, str]:
    """The environment, with the repository's src/ importable."""
    env = dict(os.environ)
    src = str(REPO_ROOT / "src")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [src, env.get("PYTHONPATH")]))
    return env


def command(blockdev: Blockdev, export: Export) -> list[str]:
    """``python -m pyvirtio blk`` serving ``export`` of ``blockdev``."""
    cmd = [python(), "-m", "pyvirtio", "blk"]
    if export.fd is not None:
        cmd += ["--fd", str(export.fd)]
    else:
        cmd += ["--socket-path", str(export.socket_path)]
    cmd += ["--image", blockdev.filename]
    if export.num_queues is not None:
        cmd += ["--num-queues", str(export.num_queues)]
    if export.logical_block_size is not None:
        cmd += ["--logical-block-size", str(export.logical_block_size)]
    if not export.writable:
        cmd.append("--read-only")
    cmd += ["--discard-segments", str(DISCARD_SEGMENTS)]
    return [*cmd, "-v"]


def daemon_log(export: Export) -> Path | None:
    """Where pyvirtio's stderr goes for ``export`` (None: inherited)."""
    log_dir = os.environ.get(LOG_DIR_ENV)
    if not log_dir:
        return None
    return Path(log_dir) / f"pyvirtio-{os.getpid()}-{export.id}.log"


def exec_one(cmd: list[str], export: Export) -> NoReturn:
    """Replace this process by the one pyvirtio."""
    path = daemon_log(export)
    if path is not None:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(fd, 2)
        os.close(fd)
    if export.fd is not None:
        os.set_inheritable(export.fd, True)
    os.execve(cmd[0], cmd, environment())


def supervise(commands: list[tuple[list[str], Export]]) -> int:
    """Run several pyvirtio processes; pass SIGTERM/SIGINT on; 0 if all exited 0 after it."""
    children: dict[int, str] = {}
    stopping = False

    def forward(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True
        log(f"got signal {signum}, passing it on to {sorted(children)}")
        for pid in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    env = environment()
    for cmd, export in commands:
        path = daemon_log(export)
        stderr = path.open("ab") if path is not None else None
        fds = (export.fd,) if export.fd is not None else ()
        proc = subprocess.Popen(cmd, env=env, pass_fds=fds, stderr=stderr)
        if stderr is not None:
            stderr.close()
        if export.fd is not None:
            os.close(export.fd)  # the child has it
        children[proc.pid] = export.id
        log(f"export {export.id}: pid {proc.pid}: {' '.join(cmd)}")
    if stopping:  # a signal came while they were being started: the later ones missed it
        forward(signal.SIGTERM, None)
    status = 0
    while children:
        pid, wait_status = os.wait()
        export_id = children.pop(pid, None)
        if export_id is None:
            continue
        code = os.waitstatus_to_exitcode(wait_status)
        log(f"export {export_id}: pid {pid} exited with {code}")
        if code != 0:
            status = 1
        if not stopping:
            log(f"error: export {export_id} stopped before SIGTERM; stopping the others")
            status = 1
            stopping = True
            forward(signal.SIGTERM, None)
    return status


def main(argv: list[str]) -> int:
    """Translate, then exec (one export) or supervise (several)."""
    try:
        blockdevs, exports = parse_args(argv)
    except UsageError as err:
        die(str(err))
    log(f"called as: {' '.join(argv)}")
    unused = sorted(set(blockdevs) - {e.node_name for e in exports})
    if unused:
        log(f"blockdevs not exported (as qemu-storage-daemon, left alone): {unused}")
    commands = [(command(blockdevs[e.node_name], e), e) for e in exports]
    if len(commands) == 1:
        cmd, export = commands[0]
        log(f"export {export.id}: exec {' '.join(cmd)}")
        exec_one(cmd, export)
    return supervise(commands)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
