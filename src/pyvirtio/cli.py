"""Command line: ``pyvirtio blk`` (a vhost-user-blk back-end) and friends.

Errors in arguments, images or sockets are reported as one line on stderr with exit status 2.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import importlib
import json
import logging
import os
import signal
import socket
import sys
import threading
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from types import FrameType
from typing import TYPE_CHECKING, Any, NoReturn

from pyvirtio import __version__
from pyvirtio.device import VirtioDevice

if TYPE_CHECKING:
    from pyvirtio.management.commands import Handler
    from pyvirtio.storage.base import Storage

log = logging.getLogger("pyvirtio")

EXIT_USAGE = 2


class UsageError(Exception):
    """Bad input from the user: reported as one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def _positive(text: str) -> int:
    try:
        value = int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be positive")
    return value


def _power_of_two(low: int, high: int) -> type[int]:
    def check(text: str) -> int:
        value = _positive(text)
        if value & (value - 1) or not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{value} is not a power of two in {low}..{high}")
        return value

    return check  # type: ignore[return-value]


def _add_vhost_user_options(p: argparse.ArgumentParser) -> None:
    """The options every vhost-user device command shares (rust-vmm vhost-device's names)."""
    where = p.add_mutually_exclusive_group()
    where.add_argument(
        "--socket-path", metavar="PATH", help="UNIX socket to listen on (created with mode 0600)"
    )
    where.add_argument(
        "--fd",
        type=int,
        metavar="N",
        help="an already listening socket (e.g. from systemd socket activation)",
    )
    p.add_argument(
        "--peer-timeout",
        type=float,
        default=5.0,
        metavar="SECONDS",
        help="how long a front-end may take to send the rest of a message it began, or to take "
        "a reply, before its session ends; also how long a new connection waits for the "
        "session in progress to end before it is refused (default 5)",
    )
    p.add_argument(
        "--control-socket",
        metavar="PATH",
        help="a UNIX socket (mode 0600) for management commands, QMP-shaped JSON lines "
        "(query, metrics, stop, and the device's own; docs/operations.md); pyvirtio ctl "
        "is its client",
    )
    p.add_argument(
        "--metrics-port",
        type=_positive,
        metavar="PORT",
        help="serve metrics in Prometheus' text format over HTTP on 127.0.0.1:PORT",
    )
    p.add_argument(
        "--seccomp",
        action="store_true",
        help="once everything is open, allow only the system calls serving needs (a seccomp "
        "filter through libseccomp; others fail with EPERM: no opening, creating or deleting "
        "files, no processes, no network sockets but an nbd:// export's; docs/security.md)",
    )
    p.add_argument(
        "--print-capabilities",
        action="store_true",
        help="print the vhost-user back-end capabilities as JSON and exit",
    )
    p.add_argument(
        "-v", "--verbose", action="count", default=0, help="more logging (-v: info, -vv: debug)"
    )


def _add_blk_parser(sub: argparse._SubParsersAction[_Parser]) -> None:
    p = sub.add_parser(
        "blk",
        help="serve a virtio-blk device over vhost-user",
        description=(
            "Serve a raw image or block device as a vhost-user-blk device. QEMU connects with "
            "-chardev socket,id=c0,path=PATH -device vhost-user-blk-pci,chardev=c0 (or "
            "vhost-user-blk on virtio-mmio machines); guest RAM must be shared "
            "(memory-backend-memfd,share=on). When a front-end disconnects the daemon waits "
            "for the next one with a fresh device. SIGTERM or SIGINT stop it after in-flight "
            "requests complete and the image is flushed."
        ),
    )
    _add_vhost_user_options(p)
    p.add_argument(
        "--image", "--blk-file", dest="image", metavar="FILE", help="raw image file or block device"
    )
    p.add_argument(
        "--nbd",
        metavar="URI",
        help="serve an NBD export instead of --image: nbd+unix:///EXPORT?socket=PATH or "
        "nbd://HOST[:PORT]/EXPORT (through libnbd; reconnects when the server comes back)",
    )
    p.add_argument(
        "--nbd-timeout",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="with --nbd: the longest a request waits for the server, in flight or for a "
        "connection, before it fails (default 30)",
    )
    p.add_argument(
        "--read-only", action="store_true", help="refuse writes (offers VIRTIO_BLK_F_RO)"
    )
    p.add_argument(
        "--num-queues",
        type=_positive,
        default=1,
        metavar="N",
        help="request queues (default 1; QEMU's num-queues must not exceed it)",
    )
    p.add_argument(
        "--queue-size",
        type=_power_of_two(4, 32768),
        default=128,
        metavar="N",
        help="the ring size the VMM is configured with (default 128, as QEMU's queue-size): "
        "seg_max is this minus 2; rings of up to 1024 descriptors (or N, if larger) are "
        "accepted anyway, as QEMU's virtio-mmio devices use 1024",
    )
    p.add_argument(
        "--logical-block-size",
        type=_power_of_two(512, 65536),
        metavar="N",
        help="logical block size in bytes (default 512, or the device's)",
    )
    p.add_argument(
        "--serial",
        default="",
        metavar="ID",
        help="device ID returned by GET_ID (up to 20 bytes; default empty)",
    )
    p.add_argument("--direct", action="store_true", help="open the image with O_DIRECT")
    p.add_argument(
        "--io-engine",
        choices=["auto", "io_uring", "sync"],
        default="sync",
        help="how --image is read and written: sync (default: preadv and pwritev on the "
        "queue's thread, the cheaper on page-cached images, docs/performance.md), io_uring "
        "(each queue keeps up to 256 requests in flight, completed as they finish; faster "
        "for large writes), or auto: io_uring where the kernel allows it, sync otherwise and "
        "under --seccomp (whose filter lets io_uring's system calls through only with "
        "--io-engine io_uring)",
    )
    p.add_argument(
        "--poll-us",
        type=int,
        default=0,
        metavar="US",
        help="before waiting for a kick, look at the ring for new requests for up to US "
        "microseconds (adaptive: less when the guest is idle; default 0: never). Lower "
        "latency for a CPU busy meanwhile",
    )
    p.add_argument(
        "--discard-segments",
        type=_positive,
        default=32,
        metavar="N",
        help="segments one DISCARD or WRITE_ZEROES request may carry, advertised as "
        "max_discard_seg and max_write_zeroes_seg; requests with more are answered UNSUPP "
        "(default 32, at most 32; qemu-storage-daemon has 1)",
    )
    p.add_argument(
        "--io-threads",
        type=int,
        default=0,
        metavar="N",
        help="threads that copy requests of 1 MiB and more while the queue's own thread goes "
        "on, up to N such requests per queue at once (default 0: everything on the queue "
        "thread; 2 raises 1 MiB sequential bandwidth on the 2-core machines measured in "
        "docs/performance.md, at a higher CPU cost). For the sync engine: io_uring and "
        "--nbd keep requests in flight without threads",
    )
    p.add_argument(
        "--writethrough",
        action="store_true",
        help="start in writethrough mode: every write is durable before it "
        "completes (the guest may switch with CONFIG_WCE)",
    )


def _add_rng_parser(sub: argparse._SubParsersAction[_Parser]) -> None:
    p = sub.add_parser(
        "rng",
        help="serve a virtio-rng (entropy) device over vhost-user",
        description=(
            "Serve a virtio-rng device. QEMU connects with -chardev socket,id=c0,path=PATH "
            "-device vhost-user-rng-pci,chardev=c0 (or vhost-user-rng-device on virtio-mmio "
            "machines); the guest's /dev/hwrng then reads from FILE (default /dev/urandom)."
        ),
    )
    _add_vhost_user_options(p)
    p.add_argument(
        "--filename",
        default="/dev/urandom",
        metavar="FILE",
        help="where the bytes come from (default /dev/urandom); a regular file is read in a loop",
    )
    p.add_argument(
        "--period",
        type=_positive,
        metavar="MS",
        help="rate limit: at most --max-bytes bytes per this many milliseconds (up to 60000)",
    )
    p.add_argument(
        "--max-bytes", type=_positive, metavar="N", help="rate limit: bytes per --period"
    )


def _add_vsock_parser(sub: argparse._SubParsersAction[_Parser]) -> None:
    p = sub.add_parser(
        "vsock",
        help="serve a virtio-vsock device over vhost-user (hybrid vsock on UNIX sockets)",
        description=(
            "Serve a virtio-vsock device whose host side is UNIX sockets, as Firecracker and "
            "vhost-device-vsock do it. A host program connects to --uds-path and writes "
            "'CONNECT <port>\\n' to reach the guest's vsock port (it reads 'OK <port>\\n' "
            "first); a guest connection to the host (CID 2) on port P goes to the socket "
            "<uds-path>_P. QEMU connects with -chardev socket,id=c0,path=PATH -device "
            "vhost-user-vsock-pci,chardev=c0 (or vhost-user-vsock-device on virtio-mmio)."
        ),
    )
    _add_vhost_user_options(p)
    p.add_argument("--guest-cid", type=int, required=False, metavar="N", help="the guest's CID")
    p.add_argument(
        "--uds-path",
        metavar="PATH",
        help="where host programs connect, and the prefix of PATH_<port> for the guest's",
    )
    p.add_argument(
        "--buf-alloc",
        type=_size,
        default=64 * 1024,
        metavar="SIZE",
        help="buffer space advertised to the guest per connection (default 64k): what waits "
        "for a slow host program, at most",
    )


def _add_net_parser(sub: argparse._SubParsersAction[_Parser]) -> None:
    p = sub.add_parser(
        "net",
        help="serve a virtio-net device over vhost-user, on a TAP device or a pyvirtio switch",
        description=(
            "Serve a virtio-net device. QEMU connects with -chardev socket,id=c0,path=PATH "
            "-netdev vhost-user,id=n0,chardev=c0 -device virtio-net-pci,netdev=n0 (or "
            "virtio-net-device on virtio-mmio). Frames go to a TAP device (--tap, which needs "
            "CAP_NET_ADMIN to create) or to every other 'pyvirtio net' on the same --switch "
            "NAME: a learning switch between guests, with no host networking."
        ),
    )
    _add_vhost_user_options(p)
    where = p.add_mutually_exclusive_group()
    where.add_argument("--tap", metavar="NAME", help="the TAP device (created if missing)")
    where.add_argument("--switch", metavar="NAME", help="the pyvirtio switch to join")
    p.add_argument(
        "--mac",
        metavar="MAC",
        help="the MAC address in the device's config space (default: random, 52:54:00:...); "
        "QEMU's virtio-net keeps its own",
    )


def _add_model_options(p: argparse.ArgumentParser, base: str) -> None:
    p.add_argument(
        "--model",
        metavar="MODULE:CLASS",
        help=f"a model of your own: a {base} subclass, imported from MODULE (the current "
        "directory or PYTHONPATH) and constructed with the --arg values (docs/devices.md)",
    )
    p.add_argument(
        "--arg",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a keyword argument for --model's class (a Python literal, or else a string); "
        "repeatable",
    )


def _add_gpio_parser(sub: argparse._SubParsersAction[_Parser]) -> None:
    p = sub.add_parser(
        "gpio",
        help="serve a virtio-gpio device over vhost-user, its lines simulated in Python",
        description=(
            "Serve a virtio-gpio controller whose lines are simulated: inputs at the levels "
            "the host sets through --control, outputs the host reads back there, interrupts "
            "on input edges and levels (or a model of your own, --model). QEMU connects with "
            "-chardev socket,id=c0,path=PATH -device vhost-user-gpio-pci,chardev=c0 (or "
            "vhost-user-gpio-device on virtio-mmio machines); the guest's libgpiod tools "
            "see a gpiochip."
        ),
    )
    _add_vhost_user_options(p)
    p.add_argument(
        "-l",
        "--device-list",
        metavar="sN",
        help="vhost-device-gpio's list for one simulated device: s<N> is N lines (default s8; "
        "host gpiochips are not served)",
    )
    p.add_argument(
        "--line-names",
        metavar="NAME,...",
        help="names of the first lines, in order (empty for none), shown by gpioinfo",
    )
    p.add_argument(
        "--no-irq",
        action="store_true",
        help="do not offer interrupts (VIRTIO_GPIO_F_IRQ)",
    )
    _add_model_options(p, "pyvirtio.devices.gpio.GpioModel")


def _add_i2c_parser(sub: argparse._SubParsersAction[_Parser]) -> None:
    p = sub.add_parser(
        "i2c",
        help="serve a virtio-i2c adapter over vhost-user, its bus's devices simulated in Python",
        description=(
            "Serve a virtio-i2c adapter whose bus holds simulated devices: a 24C02-like "
            "EEPROM and an LM75-like temperature sensor (-l), or models of your own "
            "(--model). QEMU connects with -chardev socket,id=c0,path=PATH -device "
            "vhost-user-i2c-pci,chardev=c0 (or vhost-user-i2c-device on virtio-mmio "
            "machines); the guest's i2c-tools see an I2C bus."
        ),
    )
    _add_vhost_user_options(p)
    p.add_argument(
        "-l",
        "--device-list",
        metavar="MODEL:ADDR[:ADDR],...",
        help="built-in devices and their addresses, in vhost-device-i2c's format with a model "
        "(24c02, lm75) for the host adapter; addresses decimal or 0x.. (default "
        "24c02:80,lm75:72 without --model, i.e. 0x50 and 0x48)",
    )
    _add_model_options(p, "pyvirtio.devices.i2c.I2cTarget")


def _add_serve_parser(sub: argparse._SubParsersAction[_Parser]) -> None:
    p = sub.add_parser(
        "serve",
        help="serve a device class of your own over vhost-user",
        description=(
            "Import MODULE (from the current directory or PYTHONPATH), construct its CLASS, a "
            "pyvirtio.device.VirtioDevice, with the --arg values as keyword arguments, and "
            "serve it over vhost-user: a fresh instance for each front-end. See docs/devices.md."
        ),
    )
    p.add_argument("device", metavar="MODULE:CLASS", help="the device class, e.g. mydev:Echo")
    _add_vhost_user_options(p)
    p.add_argument(
        "--arg",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a keyword argument for the class (a Python literal, or else a string); repeatable",
    )


def _add_xen_parser(sub: argparse._SubParsersAction[_Parser]) -> None:
    p = sub.add_parser(
        "xen",
        help="serve virtio-mmio disks to Xen guests as an IOREQ server",
        description=(
            "Serve the virtio disks that xl configures with disk = [ '..., "
            "backendtype=standalone, specification=virtio, target=IMAGE' ] to unmodified "
            "guests. Runs in dom0 (or the disk's backend domain), watches xenstore for disks, "
            "and handles every guest and disk until SIGTERM. Needs a hypervisor built with "
            "CONFIG_IOREQ_SERVER=y. See docs/xen.md."
        ),
    )
    p.add_argument(
        "--backend-domid",
        type=int,
        metavar="N",
        help="the domain this runs in (default: read from xenstore)",
    )
    p.add_argument(
        "--mapping",
        choices=["dynamic", "static"],
        default="dynamic",
        help="map guest RAM on demand through a bounded cache (default), or all of it at start "
        "until the guest's memory map changes (Linux guests change it while they boot), then "
        "on demand",
    )
    p.add_argument(
        "--map-cache-pages",
        type=_positive,
        default=32768,
        metavar="N",
        help="bound on guest pages mapped at once with dynamic mapping (default 32768 = 128 MiB)",
    )
    p.add_argument(
        "--notify",
        choices=["auto", "kernel", "ioreq"],
        default="auto",
        help="auto (default): interrupts through the kernel's privcmd irqfd where it has one "
        "(Linux >= 6.7), QueueNotify through this process; kernel: QueueNotify too through the "
        "kernel (privcmd ioeventfd), or fail; its handler can crash the guest (see docs/xen.md); "
        "ioreq: both through this process",
    )
    p.add_argument(
        "--num-queues",
        type=_positive,
        default=1,
        metavar="N",
        help="request queues per disk (default 1)",
    )
    p.add_argument(
        "--queue-size",
        type=_power_of_two(4, 32768),
        default=128,
        metavar="N",
        help="descriptors per queue (default 128)",
    )
    p.add_argument(
        "-v", "--verbose", action="count", default=0, help="more logging (-v: info, -vv: debug)"
    )


def _size(text: str) -> int:
    units = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
    t = text.strip().lower().removesuffix("b").removesuffix("i")
    unit = t[-1:] if t[-1:] in units else ""
    try:
        value = int(t[: len(t) - len(unit)]) * units[unit]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size (e.g. 4k, 1m, 2g)") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be positive")
    return value


def _add_bench_parser(sub: argparse._SubParsersAction[_Parser]) -> None:
    p = sub.add_parser(
        "bench",
        help="drive a vhost-user-blk back-end with a workload, no guest needed",
        description=(
            "Connect to a vhost-user-blk back-end (pyvirtio blk, qemu-storage-daemon, any "
            "other) as a VMM would, and run a fio-like workload from this process. Reports "
            "IOPS, bandwidth, latency percentiles and, with --backend-pid, the back-end's CPU "
            "time. Exits 1 if any request failed or --verify found a mismatch."
        ),
    )
    p.add_argument("--socket", required=True, metavar="PATH", help="the back-end's socket")
    p.add_argument(
        "--rw", default="randread", choices=["read", "write", "randread", "randwrite", "randrw"]
    )
    p.add_argument("--bs", type=_size, default=4096, metavar="SIZE", help="block size (4k)")
    p.add_argument(
        "--iodepth",
        type=_positive,
        default=32,
        metavar="N",
        help="requests in flight per queue (32)",
    )
    p.add_argument("--num-queues", type=_positive, default=1, metavar="N")
    when = p.add_mutually_exclusive_group()
    when.add_argument(
        "--runtime", type=float, metavar="SECONDS", help="run for this long (default 10 s)"
    )
    when.add_argument(
        "--size",
        type=_size,
        metavar="BYTES",
        help="move this many bytes (one pass over a region of this size)",
    )
    p.add_argument(
        "--verify",
        action="store_true",
        help="write patterns and read them back; a mismatch is an error",
    )
    p.add_argument(
        "--backend-pid",
        type=_positive,
        metavar="PID",
        help="report this process's CPU time per request and per GiB",
    )
    p.add_argument(
        "--busy-poll",
        action="store_true",
        help="poll the used ring instead of waiting for the call eventfd",
    )
    p.add_argument("--seed", type=int, default=1, help="seed of the random offsets")
    p.add_argument("--json", action="store_true", help="print one JSON object")


def _add_ctl_parser(sub: argparse._SubParsersAction[_Parser]) -> None:
    p = sub.add_parser(
        "ctl",
        help="send a management command to a running daemon's control socket",
        description=(
            "Talk to a daemon started with --control-socket PATH. Commands: query (the "
            "device, its queues and their statistics, as JSON), metrics (Prometheus' text "
            "format), stop, resize SIZE [--shrink] and read-only on|off (pyvirtio blk), "
            "peripheral WORDS... (pyvirtio gpio and i2c: the peripherals' own commands). "
            "Exits 1 with the daemon's error on a command it refuses."
        ),
    )
    p.add_argument("--socket", required=True, metavar="PATH", help="the control socket")
    p.add_argument(
        "ctl_command",
        metavar="command",
        help="query, metrics, stop, resize, read-only or peripheral",
    )
    p.add_argument("words", nargs="*", help="the command's arguments")
    p.add_argument("--shrink", action="store_true", help="resize: allow a smaller size")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="pyvirtio", description="VirtIO device backends in Python.")
    parser.add_argument("--version", action="version", version=f"pyvirtio {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    _add_blk_parser(sub)
    _add_rng_parser(sub)
    _add_vsock_parser(sub)
    _add_net_parser(sub)
    _add_gpio_parser(sub)
    _add_i2c_parser(sub)
    _add_serve_parser(sub)
    _add_xen_parser(sub)
    _add_bench_parser(sub)
    _add_ctl_parser(sub)
    return parser


def _setup_logging(verbose: int) -> None:
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(
        level=level, format="pyvirtio[%(process)d] %(levelname)s %(name)s: %(message)s"
    )


class _Shutdown(Exception):
    pass


def _raise_shutdown(signum: int, frame: FrameType | None) -> None:
    raise _Shutdown(signal.Signals(signum).name)


def run_blk(args: argparse.Namespace) -> int:
    if args.print_capabilities:
        print(json.dumps({"type": "block", "features": ["read-only", "blk-file"]}))
        return 0
    if args.image is None and args.nbd is None:
        raise UsageError("--image is required (or --nbd)")
    if args.image is not None and args.nbd is not None:
        raise UsageError("--image and --nbd are mutually exclusive")
    if args.nbd is not None and args.direct:
        raise UsageError("--direct goes with --image")
    if not args.nbd_timeout > 0:
        raise UsageError("--nbd-timeout must be positive")
    _check_vhost_user_args(args)
    _setup_logging(args.verbose)

    from pyvirtio.devices.blk import BlkDevice
    from pyvirtio.storage.base import StorageError
    from pyvirtio.storage.raw import open_image

    image: Storage
    try:
        if args.nbd is not None:
            from pyvirtio.storage.nbd import NbdStorage

            image = NbdStorage(args.nbd, read_only=args.read_only, timeout=args.nbd_timeout)
        else:
            # Under --seccomp, auto is sync: the filter allows io_uring's system calls only
            # to a daemon told to use it (docs/security.md).
            engine = "sync" if args.io_engine == "auto" and args.seccomp else args.io_engine
            image = open_image(
                args.image, read_only=args.read_only, direct=args.direct, engine=engine
            )
    except StorageError as exc:
        raise UsageError(str(exc)) from None
    log.info("%s: I/O engine %s", image.path, type(image).__name__)
    if args.io_threads < 0 or args.poll_us < 0:
        image.close()
        raise UsageError("--io-threads and --poll-us must be 0 or more")
    executor = (
        ThreadPoolExecutor(args.io_threads, thread_name_prefix="io") if args.io_threads else None
    )
    read_only = [image.read_only]  # set-read-only changes it for the devices to come too

    def new_device() -> BlkDevice:
        device = BlkDevice(
            image,
            num_queues=args.num_queues,
            queue_size=args.queue_size,
            logical_block_size=args.logical_block_size,
            serial=args.serial,
            writethrough=args.writethrough,
            discard_segments=args.discard_segments,
        )
        if executor is not None:
            device.use_executor(executor, args.io_threads)
        device.use_polling(args.poll_us)
        device.set_read_only(read_only[0])
        return device

    try:
        first = new_device()  # each front-end gets a fresh one; this checks the options
    except ValueError as exc:
        image.close()
        raise UsageError(str(exc)) from None
    if first.capacity_bytes == 0:
        image.close()
        raise UsageError(f"image {image.path!r} is smaller than one logical block")

    try:
        _serve_vhost_user(args, new_device, image.path, _blk_commands(image, read_only))
    finally:
        if executor is not None:
            executor.shutdown()
        if not image.read_only:
            try:
                image.flush()
            except OSError as exc:
                log.error("final flush failed: %s", exc)
        image.close()
    return 0


def _blk_commands(
    image: Storage, read_only: list[bool]
) -> Callable[[Callable[[], list[VirtioDevice]]], Mapping[str, Handler]]:
    """``resize`` and ``set-read-only`` for ``pyvirtio blk``'s control socket."""
    from pyvirtio.devices.blk import BlkDevice
    from pyvirtio.management.commands import CommandError
    from pyvirtio.storage.raw import RawImage

    def make(devices: Callable[[], list[VirtioDevice]]) -> Mapping[str, Handler]:
        def disks() -> list[BlkDevice]:
            return [d for d in devices() if isinstance(d, BlkDevice)]

        def resize(arguments: Mapping[str, Any]) -> object:
            size = arguments.get("size")
            if not isinstance(size, int) or size <= 0:
                raise CommandError('"size" must be a positive number of bytes')
            if not isinstance(image, RawImage) or image.is_block_device or image.read_only:
                raise CommandError(f"{image.path} cannot be resized here")
            if size < image.query_size() and arguments.get("shrink") is not True:
                raise CommandError('shrinking loses data: say "shrink": true to do it')
            try:
                os.ftruncate(image.fd, size)
            except OSError as exc:
                raise CommandError(f"{image.path}: {exc.strerror}") from None
            for disk in disks():
                disk.refresh_capacity()  # and the guest is told
            return {"size": size}

        def set_read_only(arguments: Mapping[str, Any]) -> object:
            flag = arguments.get("read-only")
            if not isinstance(flag, bool):
                raise CommandError('"read-only" must be true or false')
            if not flag and image.read_only:
                raise CommandError(f"{image.path} was opened read-only")
            read_only[0] = flag
            for disk in disks():
                disk.set_read_only(flag)
            return {"read-only": flag}

        return {"resize": resize, "set-read-only": set_read_only}

    return make


def _check_vhost_user_args(args: argparse.Namespace) -> None:
    if args.socket_path is None and args.fd is None:
        raise UsageError("one of --socket-path or --fd is required")
    if not args.peer_timeout > 0:
        raise UsageError("--peer-timeout must be positive")


def _serve_vhost_user(
    args: argparse.Namespace,
    new_device: Callable[[], VirtioDevice],
    what: str,
    commands: Callable[[Callable[[], list[VirtioDevice]]], Mapping[str, Handler]] | None = None,
) -> None:
    """Serve devices from ``new_device`` on the socket the options name until a signal or a
    ``stop`` command, with the control socket, metrics and systemd readiness the options ask
    for; ``commands(devices)`` makes the device's own management commands, ``devices()``
    being the devices served at the moment."""
    from prometheus_client import start_http_server

    from pyvirtio.management.commands import Commands, common_commands
    from pyvirtio.management.metrics import registry_for
    from pyvirtio.management.server import ControlServer
    from pyvirtio.management.systemd import notify
    from pyvirtio.shims.vhost_user.server import VhostUserServer
    from pyvirtio.unix_socket import SocketError, listening_socket

    signal.signal(signal.SIGTERM, _raise_shutdown)
    signal.signal(signal.SIGINT, _raise_shutdown)
    server: VhostUserServer | None = None

    def devices() -> list[VirtioDevice]:
        session = server.session if server is not None else None
        return [session.device] if session is not None else []

    def stop() -> None:
        if server is not None:
            threading.Thread(target=server.stop, daemon=True).start()

    try:
        with contextlib.ExitStack() as stack:
            if args.fd is not None:
                try:
                    listener = socket.socket(fileno=args.fd)
                except OSError as exc:
                    raise UsageError(f"--fd {args.fd}: {exc.strerror}") from None
                if listener.family != socket.AF_UNIX:
                    raise UsageError(f"--fd {args.fd} is not a UNIX socket")
                where = f"fd {args.fd}"
            else:
                try:
                    listener = stack.enter_context(listening_socket(args.socket_path))
                except SocketError as exc:
                    raise UsageError(str(exc)) from None
                where = args.socket_path
            server = VhostUserServer(
                new_device,
                listener,
                stall_timeout=args.peer_timeout,
                takeover_wait=args.peer_timeout,
            )
            if args.control_socket is not None:
                try:
                    control = stack.enter_context(listening_socket(args.control_socket))
                except SocketError as exc:
                    raise UsageError(f"--control-socket: {exc}") from None
                own = commands(devices) if commands is not None else {}
                handlers = {**common_commands(devices, stop), **own}
                stack.callback(ControlServer(Commands(handlers), control).close)
            if args.metrics_port is not None:
                try:
                    http, _ = start_http_server(
                        args.metrics_port, addr="127.0.0.1", registry=registry_for(devices)
                    )
                except OSError as exc:
                    raise UsageError(f"--metrics-port {args.metrics_port}: {exc}") from None
                stack.callback(http.shutdown)
            if args.seccomp:
                _load_syscall_filter(args)
            log.info("serving %s on %s", what, where)
            notify("READY=1")
            server.serve_forever()
    except _Shutdown as why:
        log.info("%s: shutting down", why)
    finally:
        if server is not None:
            server.stop()


def _load_syscall_filter(args: argparse.Namespace) -> None:
    from pyvirtio.syscall_filter import FilterError, install

    nbd = getattr(args, "nbd", None) or ""
    try:
        install(
            network=nbd.startswith(("nbd://", "nbds://")),
            io_uring=getattr(args, "io_engine", None) == "io_uring",
        )
    except FilterError as exc:
        raise UsageError(f"--seccomp: {exc}") from None


def run_rng(args: argparse.Namespace) -> int:
    if args.print_capabilities:
        print(json.dumps({"type": "rng"}))
        return 0
    _check_vhost_user_args(args)
    if (args.period is None) != (args.max_bytes is None):
        raise UsageError("--period and --max-bytes go together")
    _setup_logging(args.verbose)
    from pyvirtio.devices.rng import RngDevice

    period = args.period / 1000 if args.period is not None else None

    def new_device() -> RngDevice:
        return RngDevice(source=args.filename, period=period, max_bytes=args.max_bytes)

    try:
        new_device().close()  # checks the options and the source
    except OSError as exc:
        raise UsageError(f"{args.filename}: {exc.strerror}") from None
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    _serve_vhost_user(args, new_device, f"entropy from {args.filename}")
    return 0


def run_vsock(args: argparse.Namespace) -> int:
    if args.print_capabilities:
        print(json.dumps({"type": "vsock"}))
        return 0
    _check_vhost_user_args(args)
    if args.guest_cid is None or args.uds_path is None:
        raise UsageError("--guest-cid and --uds-path are required")
    _setup_logging(args.verbose)
    from pyvirtio.devices.vsock import VsockDevice
    from pyvirtio.unix_socket import SocketError, listening_socket

    try:
        with listening_socket(args.uds_path) as listener:

            def new_device() -> VsockDevice:
                return VsockDevice(
                    args.guest_cid, args.uds_path, listener=listener, buf_alloc=args.buf_alloc
                )

            try:
                new_device().close()
            except ValueError as exc:
                raise UsageError(str(exc)) from None
            _serve_vhost_user(args, new_device, f"vsock for CID {args.guest_cid}")
    except SocketError as exc:
        raise UsageError(str(exc)) from None
    return 0


def run_net(args: argparse.Namespace) -> int:
    if args.print_capabilities:
        print(json.dumps({"type": "net"}))
        return 0
    _check_vhost_user_args(args)
    if args.tap is None and args.switch is None:
        raise UsageError("one of --tap or --switch is required")
    _setup_logging(args.verbose)
    from pyvirtio.devices.net import NetDevice, parse_mac, random_mac
    from pyvirtio.network.port import NetPort
    from pyvirtio.network.switch import SwitchError, SwitchPort
    from pyvirtio.network.tap import Tap, TapError

    try:
        mac = parse_mac(args.mac) if args.mac else random_mac()
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    try:
        port: NetPort = Tap(args.tap) if args.tap else SwitchPort(args.switch)
    except (TapError, SwitchError) as exc:
        raise UsageError(str(exc)) from None
    try:
        where = f"TAP {args.tap}" if args.tap else f"switch {args.switch}"
        _serve_vhost_user(args, lambda: NetDevice(port, mac=mac), f"a network device on {where}")
    finally:
        port.close()
    return 0


def _literal(text: str) -> object:
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def _load_class(spec: str, items: list[str], base: type) -> tuple[type, dict[str, Any]]:
    """The class ``MODULE:CLASS`` names (a ``base`` subclass, imported from the current
    directory or PYTHONPATH) and the keyword arguments the ``--arg KEY=VALUE`` items give."""
    module_name, _, class_name = spec.partition(":")
    if not module_name or not class_name:
        raise UsageError(f"{spec!r} is not MODULE:CLASS")
    kwargs: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.isidentifier():
            raise UsageError(f"--arg {item!r} is not KEY=VALUE")
        kwargs[key] = _literal(value)
    sys.path.insert(0, os.getcwd())
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError) as exc:
        raise UsageError(f"cannot load {spec}: {exc}") from None
    if not (isinstance(cls, type) and issubclass(cls, base)):
        raise UsageError(f"{spec} is not a {base.__module__}.{base.__name__} class")
    return cls, kwargs


def _model(args: argparse.Namespace, base: type) -> Any:
    """An instance of ``--model MODULE:CLASS`` (a ``base`` subclass) with the --arg values."""
    cls, kwargs = _load_class(args.model, args.arg, base)
    try:
        return cls(**kwargs)
    except Exception as exc:
        raise UsageError(f"{args.model}({kwargs}): {exc}") from None


def run_gpio(args: argparse.Namespace) -> int:
    if args.print_capabilities:
        print(json.dumps({"type": "gpio"}))
        return 0
    _check_vhost_user_args(args)
    if args.model is None and args.arg:
        raise UsageError("--arg goes with --model")
    if args.model is not None and (args.device_list or args.line_names):
        raise UsageError("--model makes its own lines: no -l or --line-names with it")
    _setup_logging(args.verbose)
    from pyvirtio.devices.gpio import GpioDevice, GpioModel, SimulatedGpio
    from pyvirtio.management.commands import peripheral_command

    if args.model is not None:
        model: GpioModel = _model(args, GpioModel)
    else:
        spec = args.device_list or "s8"
        if not spec.startswith("s") or not spec[1:].isdigit() or ":" in spec:
            raise UsageError(
                f"-l {spec!r}: one simulated device, s<N> (host gpiochips are not served)"
            )
        names = args.line_names.split(",") if args.line_names else []
        try:
            model = SimulatedGpio(int(spec[1:]), names)
        except ValueError as exc:
            raise UsageError(str(exc)) from None

    def new_device() -> GpioDevice:
        return GpioDevice(model, irq=not args.no_irq)

    new_device().close()
    what = f"{model.ngpio} GPIO lines ({type(model).__name__})"
    _serve_vhost_user(
        args, new_device, what, lambda _: {"peripheral": peripheral_command(model.control)}
    )
    return 0


def run_i2c(args: argparse.Namespace) -> int:
    if args.print_capabilities:
        print(json.dumps({"type": "i2c"}))
        return 0
    _check_vhost_user_args(args)
    if args.model is None and args.arg:
        raise UsageError("--arg goes with --model")
    _setup_logging(args.verbose)
    from pyvirtio.devices.i2c import (
        DEFAULT_DEVICE_LIST,
        I2cBus,
        I2cDevice,
        I2cTarget,
        parse_device_list,
    )
    from pyvirtio.management.commands import peripheral_command

    spec = args.device_list or ("" if args.model else DEFAULT_DEVICE_LIST)
    try:
        targets = parse_device_list(spec) if spec else []
        if args.model is not None:
            targets.append(_model(args, I2cTarget))
        bus = I2cBus(targets)
    except ValueError as exc:
        raise UsageError(str(exc)) from None

    def new_device() -> I2cDevice:
        return I2cDevice(bus)

    what = "an I2C bus with " + ", ".join(
        f"{t.kind} at {a:#04x}" for a, t in sorted(bus.targets.items())
    )
    _serve_vhost_user(
        args, new_device, what, lambda _: {"peripheral": peripheral_command(bus.control)}
    )
    return 0


def run_serve(args: argparse.Namespace) -> int:
    if args.print_capabilities:
        print(json.dumps({"type": args.device.partition(":")[2].lower()}))
        return 0
    _check_vhost_user_args(args)
    _setup_logging(args.verbose)
    cls, kwargs = _load_class(args.device, args.arg, VirtioDevice)

    def new_device() -> VirtioDevice:
        device: VirtioDevice = cls(**kwargs)
        return device

    try:
        new_device().close()
    except Exception as exc:
        raise UsageError(f"{args.device}({kwargs}): {exc}") from None
    _serve_vhost_user(args, new_device, args.device)
    return 0


def run_xen(args: argparse.Namespace) -> int:
    _setup_logging(args.verbose)
    from pyvirtio.devices.blk import BlkDevice
    from pyvirtio.devices.rng import RngDevice
    from pyvirtio.shims.xen.config import (
        MAX_VALUE,
        ConfigError,
        DiskConfig,
        parse_device_description,
    )
    from pyvirtio.shims.xen.daemon import Options, XenBackendDaemon
    from pyvirtio.shims.xen.libs import XenError
    from pyvirtio.storage.raw import ImageError, RawImage

    def new_device(config: DiskConfig) -> tuple[VirtioDevice, str]:
        """A disk on its image, or the device a ``*.pyvirtio`` description names."""
        if config.described:
            with open(config.image, encoding="utf-8", errors="replace") as f:
                kind, source = parse_device_description(f.read(MAX_VALUE + 1))
            return RngDevice(source=source), f"{kind} from {source}"
        try:
            image = RawImage(config.image, read_only=config.read_only)
        except ImageError as exc:
            raise ConfigError(str(exc)) from None
        try:
            device = BlkDevice(
                image,
                num_queues=args.num_queues,
                queue_size=args.queue_size,
                serial=f"xen-{config.frontend_id}-{config.devid}",
                owns_image=True,
            )
        except BaseException:
            image.close()
            raise
        return device, f"{config.image} ({'ro' if config.read_only else 'rw'})"

    options = Options(
        backend_domid=args.backend_domid,
        static_mapping=args.mapping == "static",
        map_cache_pages=args.map_cache_pages,
        notify=args.notify,
    )
    try:
        daemon = XenBackendDaemon(options, new_device)
    except XenError as exc:
        raise UsageError(f"cannot reach Xen: {exc.strerror or exc}") from None
    signal.signal(signal.SIGTERM, _raise_shutdown)
    signal.signal(signal.SIGINT, _raise_shutdown)
    signal.signal(signal.SIGUSR1, lambda _sig, _frame: daemon.request_stats())
    try:
        daemon.run()
    except _Shutdown as why:
        log.info("%s: shutting down", why)
    finally:
        daemon.close()
    return 0


def run_bench(args: argparse.Namespace) -> int:
    from pyvirtio.bench.loadgen import BenchError, LoadGenerator, Workload, process_cpu_seconds
    from pyvirtio.driver.vhost_user_frontend import FrontendError

    workload = Workload(
        rw=args.rw,
        bs=args.bs,
        iodepth=args.iodepth,
        num_queues=args.num_queues,
        runtime=None if args.size is not None else (args.runtime or 10.0),
        size=args.size,
        verify=args.verify,
        seed=args.seed,
        busy_poll=args.busy_poll,
    )
    try:
        gen = LoadGenerator(args.socket, workload)
    except (BenchError, FrontendError) as exc:
        raise UsageError(str(exc)) from None
    cpu_before = process_cpu_seconds(args.backend_pid) if args.backend_pid else 0.0
    try:
        result = gen.run(progress=not args.json)
    except (BenchError, FrontendError) as exc:
        print(f"pyvirtio bench: error: {exc}", file=sys.stderr)
        return 1
    finally:
        gen.close()
    report: dict[str, object] = {
        "rw": args.rw,
        "bs": args.bs,
        "iodepth": args.iodepth,
        "num_queues": args.num_queues,
        "elapsed_s": round(result.elapsed, 6),
        "completed": result.completed,
        "iops": round(result.iops, 1),
        "bw_bytes": round(result.bw_bytes),
        "lat_ns": {
            "p50": result.percentile(50),
            "p99": result.percentile(99),
            "p999": result.percentile(99.9),
        },
        "errors": result.errors,
        "verify_errors": result.verify_errors,
    }
    if args.backend_pid:
        cpu = process_cpu_seconds(args.backend_pid) - cpu_before
        report["backend_cpu_s"] = round(cpu, 3)
        requests = result.completed + result.errors
        report["backend_cpu_s_per_request"] = cpu / requests if requests else None
        report["backend_cpu_s_per_gib"] = cpu / (result.bytes / (1 << 30)) if result.bytes else None
    if args.json:
        print(json.dumps(report))
    else:
        lat = report["lat_ns"]
        assert isinstance(lat, dict)
        line = (
            f"{args.rw} bs={args.bs} iodepth={args.iodepth} queues={args.num_queues}: "
            f"{result.iops:.0f} IOPS, {result.bw_bytes / (1 << 20):.1f} MiB/s, "
            f"latency p50 {lat['p50'] / 1000:.0f} us, p99 {lat['p99'] / 1000:.0f} us, "
            f"p99.9 {lat['p999'] / 1000:.0f} us; errors {result.errors}"
        )
        if args.verify:
            line += f", verify errors {result.verify_errors}"
        if args.backend_pid:
            line += f"; back-end CPU {report['backend_cpu_s']} s"
        print(line)
    return 1 if result.errors or result.verify_errors else 0


def run_ctl(args: argparse.Namespace) -> int:
    from pyvirtio.management.client import ControlClient, ControlClientError

    command, words = args.ctl_command, args.words
    arguments: dict[str, object] = {}
    if command == "resize":
        if len(words) != 1:
            raise UsageError("resize SIZE (bytes, or with k, m, g)")
        try:
            arguments["size"] = _size(words[0])
        except argparse.ArgumentTypeError as exc:
            raise UsageError(str(exc)) from None
        if args.shrink:
            arguments["shrink"] = True
    elif command == "read-only":
        if words not in (["on"], ["off"]):
            raise UsageError("read-only on|off")
        command, arguments["read-only"] = "set-read-only", words == ["on"]
    elif command == "peripheral":
        if not words:
            raise UsageError("peripheral WORDS... (e.g. peripheral get 3)")
        arguments["command"] = " ".join(words)
    elif words:
        raise UsageError(f"{command} takes no arguments")
    try:
        with ControlClient(args.socket) as client:
            result = client.call(command, **arguments)
    except ControlClientError as exc:
        print(f"pyvirtio ctl: {exc}", file=sys.stderr)
        return 1
    if command == "metrics":
        print(result["text"], end="")
    elif command == "peripheral":
        print(result["reply"])
    else:
        print(json.dumps(result, indent=2))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    try:
        if args.command == "blk":
            return run_blk(args)
        if args.command == "rng":
            return run_rng(args)
        if args.command == "vsock":
            return run_vsock(args)
        if args.command == "net":
            return run_net(args)
        if args.command == "gpio":
            return run_gpio(args)
        if args.command == "i2c":
            return run_i2c(args)
        if args.command == "serve":
            return run_serve(args)
        if args.command == "xen":
            return run_xen(args)
        if args.command == "bench":
            return run_bench(args)
        if args.command == "ctl":
            return run_ctl(args)
    except UsageError as exc:
        print(f"pyvirtio {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    raise AssertionError(args.command)
