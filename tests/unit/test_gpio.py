"""virtio-gpio through the in-process driver: line names, directions and values seen from both
sides, interrupts (edges latched while masked, levels never, event buffers returned out of
order, INVALID when disabled), a new driver after a ring restart, hostile requests, the control
socket and ``pyvirtio gpio`` over vhost-user."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from pyvirtio.devices.gpio import GpioDevice, GpioModel, SimulatedGpio
from pyvirtio.driver.gpio import GpioDriver, GpioRequestError
from pyvirtio.driver.mmio import DriverError, MmioDriver
from pyvirtio.management.client import ControlClient
from pyvirtio.management.commands import Commands, peripheral_command
from pyvirtio.shims.inprocess import InProcessMachine
from pyvirtio.spec.features import Feature, bit
from pyvirtio.spec.gpio import (
    EVENT_QUEUE,
    REQUEST,
    REQUEST_QUEUE,
    Direction,
    GpioMsg,
    IrqStatus,
    IrqType,
)
from pyvirtio.spec.status import DeviceStatus
from pyvirtio.virtqueue.split import QueueLayout

VALID, INVALID = IrqStatus.VALID, IrqStatus.INVALID


@dataclass
class Rig:
    model: GpioModel
    device: GpioDevice
    machine: InProcessMachine
    driver: GpioDriver


def _rig(model: GpioModel, *, irq: bool = True, threaded: bool = False) -> Rig:
    device = GpioDevice(model)
    machine = InProcessMachine(device, memory_size=1 << 20, threaded=threaded)
    wait = machine.wait_interrupt if threaded else None
    return Rig(model, device, machine, GpioDriver(machine.driver(), irq=irq, wait=wait))


@pytest.fixture
def rig() -> Iterator[Rig]:
    r = _rig(SimulatedGpio(8, ["MMC-CD", "", "Red LED Vdd"]))
    try:
        yield r
    finally:
        r.machine.close()


def test_config_and_line_names(rig: Rig) -> None:
    assert rig.driver.ngpio == 8
    # §5.18.6.1's layout: each name zero-terminated, a lone zero for a line without one
    assert rig.driver.names_size == len(b"MMC-CD\0\0Red LED Vdd\0") + 5
    assert rig.driver.line_names() == ["MMC-CD", "", "Red LED Vdd", "", "", "", "", ""]


def test_no_names_means_size_zero_and_the_message_fails() -> None:
    r = _rig(SimulatedGpio(4))
    try:
        assert r.driver.names_size == 0
        with pytest.raises(GpioRequestError):
            r.driver.request(GpioMsg.GET_LINE_NAMES, 0, response=2)
    finally:
        r.machine.close()


def test_outputs_show_on_the_host_and_inputs_reach_the_guest(rig: Rig) -> None:
    drv, model = rig.driver, rig.model
    assert drv.get_direction(0) == Direction.NONE
    drv.direction_output(0, 1)
    assert drv.get_direction(0) == Direction.OUT
    assert (model.direction(0), model.output(0), model.level(0)) == (Direction.OUT, 1, 1)
    drv.set_value(0, 0)
    assert model.level(0) == 0 and drv.get_value(0) == 0
    drv.set_direction(3, Direction.IN)
    assert drv.get_value(3) == 0
    model.set_input(3, 1)
    assert drv.get_value(3) == 1 and model.output(3) is None
    # Direction none: the line's state goes (§5.18.6), the guest no longer drives it
    drv.set_direction(0, Direction.NONE)
    assert model.output(0) is None and model.direction(0) == Direction.NONE
    drv.set_direction(0, Direction.OUT)
    assert model.output(0) == 0  # the value set before was discarded with the line's state


def test_a_value_set_before_the_direction_is_used(rig: Rig) -> None:
    seen: list[tuple[int, int | None]] = []
    rig.model.on_output = lambda line, value: seen.append((line, value))  # type: ignore[method-assign]
    rig.driver.set_value(5, 1)
    assert seen == [] and rig.model.output(5) is None
    rig.driver.set_direction(5, Direction.OUT)
    rig.driver.set_direction(5, Direction.IN)
    assert seen == [(5, 1), (5, None)]


@pytest.mark.parametrize(
    ("kind", "gpio", "value"),
    [
        (GpioMsg.GET_VALUE, 8, 0),  # no such line
        (GpioMsg.SET_DIRECTION, 0, 3),
        (GpioMsg.SET_VALUE, 0, 2),
        (GpioMsg.SET_IRQ_TYPE, 0, 5),
        (GpioMsg.SET_IRQ_TYPE, 0xFFFF, 1),
        (0x0007, 0, 0),  # unknown message
        (0, 0, 0),
    ],
)
def test_bad_messages_get_an_error_status(rig: Rig, kind: int, gpio: int, value: int) -> None:
    with pytest.raises(GpioRequestError):
        rig.driver.request(kind, gpio, value)
    assert not rig.driver.transport.status & DeviceStatus.NEEDS_RESET
    assert rig.driver.get_direction(0) == Direction.NONE  # and the device goes on


def test_interrupt_rules(rig: Rig) -> None:
    drv = rig.driver
    drv.direction_output(1, 0)
    with pytest.raises(GpioRequestError):  # §5.18.6: no interrupt on an output line
        drv.set_irq_type(1, IrqType.EDGE_RISING)
    drv.set_direction(2, Direction.IN)
    drv.set_irq_type(2, IrqType.EDGE_RISING)
    with pytest.raises(GpioRequestError):  # another type only after disabling it
        drv.set_irq_type(2, IrqType.EDGE_FALLING)
    drv.set_irq_type(2, IrqType.NONE)
    drv.set_irq_type(2, IrqType.EDGE_FALLING)


def test_without_the_irq_feature_interrupts_are_refused() -> None:
    r = _rig(SimulatedGpio(4), irq=False)
    try:
        assert not r.driver.irq
        with pytest.raises(GpioRequestError):
            r.driver.set_irq_type(0, IrqType.EDGE_RISING)
    finally:
        r.machine.close()


def test_an_edge_is_latched_while_masked_and_reported_once_unmasked(rig: Rig) -> None:
    drv, model = rig.driver, rig.model
    drv.set_direction(4, Direction.IN)
    drv.set_irq_type(4, IrqType.EDGE_RISING)
    model.set_input(4, 1)  # no buffer yet: masked, latched
    model.set_input(4, 0)  # a falling edge: not this interrupt's
    drv.unmask(4)
    assert drv.events() == [(4, VALID, 1)]
    drv.unmask(4)
    model.set_input(4, 0)  # no change: nothing
    assert drv.events() == []
    model.set_input(4, 1)
    assert drv.events() == [(4, VALID, 1)]


def test_both_edges(rig: Rig) -> None:
    drv, model = rig.driver, rig.model
    drv.set_direction(6, Direction.IN)
    drv.set_irq_type(6, IrqType.EDGE_BOTH)
    drv.unmask(6)
    model.set_input(6, 1)
    assert drv.events() == [(6, VALID, 1)]
    drv.unmask(6)
    model.set_input(6, 0)
    assert drv.events() == [(6, VALID, 1)]


def test_a_level_is_never_latched_and_reported_while_active(rig: Rig) -> None:
    drv, model = rig.driver, rig.model
    drv.set_direction(3, Direction.IN)
    drv.set_irq_type(3, IrqType.LEVEL_HIGH)
    model.set_input(3, 1)
    model.set_input(3, 0)  # active and gone while masked: not latched (§5.18.6)
    drv.unmask(3)
    assert drv.events() == []
    model.set_input(3, 1)
    assert drv.events() == [(3, VALID, 1)]
    drv.unmask(3)  # still high: reported again as soon as it is unmasked
    assert drv.events() == [(3, VALID, 1)]
    model.set_input(3, 0)
    drv.unmask(3)
    assert drv.events() == []


def test_event_buffers_come_back_in_the_order_lines_fire(rig: Rig) -> None:
    drv, model = rig.driver, rig.model
    for line in (1, 2, 5):
        drv.set_direction(line, Direction.IN)
        drv.set_irq_type(line, IrqType.EDGE_RISING)
        drv.unmask(line)
    model.set_input(5, 1)
    assert drv.events() == [(5, VALID, 1)]
    model.set_input(1, 1)
    assert drv.events() == [(1, VALID, 1)]
    # disabling the interrupt gives the line's buffer back, INVALID (§5.18.7)
    drv.set_irq_type(2, IrqType.NONE)
    assert drv.events() == [(2, INVALID, 1)]
    model.set_input(2, 1)
    assert drv.events() == []


def test_direction_none_gives_the_buffer_back(rig: Rig) -> None:
    drv = rig.driver
    drv.set_direction(7, Direction.IN)
    drv.set_irq_type(7, IrqType.LEVEL_LOW)
    rig.model.set_input(7, 1)
    drv.unmask(7)
    assert drv.events() == []
    drv.set_direction(7, Direction.NONE)
    assert drv.events() == [(7, INVALID, 1)]
    drv.set_direction(7, Direction.IN)
    rig.model.set_input(7, 0)
    drv.unmask(7)  # the interrupt went with the line's state: the buffer comes straight back
    assert drv.events() == [(7, INVALID, 1)]


def test_misplaced_event_buffers_come_straight_back(rig: Rig) -> None:
    drv = rig.driver
    drv.unmask(0)  # interrupt not enabled
    drv.unmask(200)  # no such line
    assert sorted(drv.events()) == [(0, INVALID, 1), (200, INVALID, 1)]
    drv.set_direction(1, Direction.IN)
    drv.set_irq_type(1, IrqType.EDGE_FALLING)
    drv.unmask(1)
    drv._events.pop(1)  # a second buffer for the same line (§5.18.7: MUST NOT)
    drv.unmask(1)
    assert drv.events() == [(1, INVALID, 1)]
    assert not drv.transport.status & DeviceStatus.NEEDS_RESET


def test_reset_forgets_the_driver_and_its_buffers(rig: Rig) -> None:
    drv = rig.driver
    drv.direction_output(0, 1)
    drv.set_direction(1, Direction.IN)
    drv.set_irq_type(1, IrqType.EDGE_RISING)
    drv.unmask(1)
    drv.transport.reset()
    assert rig.model.output(0) is None
    fresh = GpioDriver(drv.transport)
    rig.model.set_input(1, 1)
    assert fresh.get_direction(1) == Direction.NONE
    assert fresh.transport.queues[EVENT_QUEUE].used_idx == 0


def test_a_ring_that_resumes_keeps_its_buffers_and_a_new_one_does_not(rig: Rig) -> None:
    drv, device, model = rig.driver, rig.device, rig.model
    drv.set_direction(2, Direction.IN)
    drv.set_irq_type(2, IrqType.EDGE_RISING)
    drv.unmask(2)
    queue = device.queues[EVENT_QUEUE]
    layout = QueueLayout(queue.size, queue.desc_addr, queue.avail_addr, queue.used_addr)
    # as a vhost-user front-end pausing and resuming: the same ring, where it stopped
    base = device.stop_queue(EVENT_QUEUE)
    device.start_queue(EVENT_QUEUE, layout, last_avail_idx=base, used_idx=None)
    model.set_input(2, 1)
    assert drv.events() == [(2, VALID, 1)]
    drv.unmask(2)
    # as after a guest reboot: the ring comes back elsewhere (or from 0): a new driver
    base = device.stop_queue(EVENT_QUEUE)
    moved = QueueLayout(layout.size, layout.desc, layout.avail, layout.used + 4096)
    device.start_queue(EVENT_QUEUE, moved, last_avail_idx=0, used_idx=0)
    model.set_input(2, 0)
    model.set_input(2, 1)
    assert device.queues[EVENT_QUEUE].used_idx == 0  # nothing pushed for the old driver
    assert drv.get_direction(2) == Direction.NONE


def test_interrupts_with_queue_threads() -> None:
    r = _rig(SimulatedGpio(4), threaded=True)
    try:
        drv = r.driver
        for line in range(4):
            drv.set_direction(line, Direction.IN)
            drv.set_irq_type(line, IrqType.EDGE_BOTH)
            drv.unmask(line)
        for line in (3, 0, 2, 1):
            r.model.set_input(line, 1)
            assert drv.wait_events(5) == [(line, VALID, 1)]
            drv.unmask(line)
        drv.set_irq_type(0, IrqType.NONE)  # the reply waits for the buffer to go back
        assert drv.events() == [(0, INVALID, 1)]
    finally:
        r.machine.close()


class Loopback(GpioModel):
    """docs/devices.md's model: line 0 is an LED wired back to input 1; line 2 a button."""

    def __init__(self) -> None:
        super().__init__(ngpio=3, names=["led", "led-sense", "button"])

    def on_output(self, line: int, value: int | None) -> None:
        if line == 0:
            self.set_input(1, value or 0)


@pytest.mark.parametrize("threaded", [False, True])
def test_a_model_of_ones_own_wires_an_output_to_an_input(threaded: bool) -> None:
    r = _rig(Loopback(), threaded=threaded)
    try:
        drv = r.driver
        assert drv.line_names() == ["led", "led-sense", "button"]
        drv.set_direction(1, Direction.IN)
        drv.set_irq_type(1, IrqType.EDGE_BOTH)
        drv.unmask(1)
        drv.direction_output(0, 1)
        assert drv.get_value(1) == 1
        assert drv.wait_events(5) == [(1, VALID, 1)]
        drv.unmask(1)
        drv.set_direction(0, Direction.NONE)  # the guest lets go: the LED goes dark
        assert drv.wait_events(5) == [(1, VALID, 1)]
        assert drv.get_value(1) == 0
    finally:
        r.machine.close()


# -- hostile requests ---------------------------------------------------------------------------


def _raw(rig: Rig, index: int, out: list[bytes], in_sizes: list[int]) -> tuple[int, bytes]:
    """Put one raw chain on a queue; returns (bytes written, the writable bytes)."""
    return _raw_on(rig.machine, rig.driver.transport, index, out, in_sizes)


def _raw_on(
    machine: InProcessMachine,
    transport: MmioDriver,
    index: int,
    out: list[bytes],
    in_sizes: list[int],
) -> tuple[int, bytes]:
    memory, allocator = machine.memory, machine.allocator
    outs = []
    for data in out:
        addr = allocator.alloc(max(1, len(data)))
        memory.write(addr, data)
        outs.append((addr, len(data)))
    ins = [(allocator.alloc(max(1, n)), n) for n in in_sizes]
    for addr, n in ins:
        memory.write(addr, b"\xee" * n)
    queue = transport.queues[index]
    queue.add(outs, ins, "raw", indirect=False)
    transport.notify(index)
    used = queue.get_used()
    written = used[0][1] if used else -1
    return written, b"".join(memory.read(a, n) for a, n in ins)


def test_malformed_requests_get_an_error_status(rig: Rig) -> None:
    good = REQUEST.pack(GpioMsg.GET_VALUE, 0, 0)
    assert _raw(rig, REQUEST_QUEUE, [good], [2]) == (2, b"\x00\x00")
    assert _raw(rig, REQUEST_QUEUE, [good[:4]], [2]) == (2, b"\x01\x00")  # short
    assert _raw(rig, REQUEST_QUEUE, [good + b"xx"], [2]) == (2, b"\x01\x00")  # long
    assert _raw(rig, REQUEST_QUEUE, [good[:3], good[3:]], [1, 1]) == (2, b"\x00\x00")  # split
    assert _raw(rig, REQUEST_QUEUE, [good], [1]) == (1, b"\x00")  # only the status fits
    assert _raw(rig, REQUEST_QUEUE, [good], [64]) == (2, b"\x00\x00" + b"\xee" * 62)
    assert not rig.driver.transport.status & DeviceStatus.NEEDS_RESET


def test_a_request_without_a_response_buffer_needs_reset(rig: Rig) -> None:
    _raw(rig, REQUEST_QUEUE, [REQUEST.pack(GpioMsg.GET_VALUE, 0, 0)], [])
    assert rig.driver.transport.status & DeviceStatus.NEEDS_RESET


def test_malformed_event_buffers(rig: Rig) -> None:
    assert _raw(rig, EVENT_QUEUE, [b"\x01"], [1]) == (1, b"\x00")  # short: INVALID
    assert _raw(rig, EVENT_QUEUE, [struct.pack("<H", 0) * 2], [1]) == (1, b"\x00")
    assert not rig.driver.transport.status & DeviceStatus.NEEDS_RESET
    _raw(rig, EVENT_QUEUE, [struct.pack("<H", 0)], [])  # no status byte
    assert rig.driver.transport.status & DeviceStatus.NEEDS_RESET


def test_the_event_queue_without_the_irq_feature_needs_reset() -> None:
    with InProcessMachine(GpioDevice(SimulatedGpio(4)), memory_size=1 << 20) as machine:
        transport = machine.driver()
        transport.negotiate(bit(Feature.VERSION_1))  # no VIRTIO_GPIO_F_IRQ
        transport.setup_queues(2)  # but the event queue anyway
        transport.driver_ok()
        _raw_on(machine, transport, EVENT_QUEUE, [struct.pack("<H", 0)], [1])
        assert transport.status & DeviceStatus.NEEDS_RESET


def test_a_model_that_fails_does_not_break_the_device(rig: Rig) -> None:
    def broken(line: int, value: int | None) -> None:
        raise RuntimeError("model bug")

    rig.model.on_output = broken  # type: ignore[method-assign]
    rig.driver.direction_output(0, 1)
    assert rig.model.output(0) == 1
    assert not rig.driver.transport.status & DeviceStatus.NEEDS_RESET


@pytest.mark.parametrize(
    ("ngpio", "names"),
    [(0, []), (0x10000, []), (2, ["a", "b", "c"]), (3, ["a", "a"]), (2, ["\u00e9"]), (2, ["a\0"])],
)
def test_bad_models_are_refused(ngpio: int, names: list[str]) -> None:
    with pytest.raises(ValueError):
        SimulatedGpio(ngpio, names)


# -- the control interface ----------------------------------------------------------------------


def _ask(commands: Commands, line: str) -> str:
    """One peripheral command through the management commands, as "OK ..." or "ERR ..."."""
    request = json.dumps({"execute": "peripheral", "arguments": {"command": line}})
    reply = json.loads(commands.handle(request.encode()))
    if "error" in reply:
        return f"ERR {reply['error']['desc']}"
    return f"OK {reply['return']['reply']}".rstrip()


def test_control_commands(rig: Rig) -> None:
    c = Commands({"peripheral": peripheral_command(rig.model.control)})
    assert _ask(c, "lines") == "OK 8"
    rig.driver.direction_output(2, 1)
    assert _ask(c, "get 2") == "OK 1"
    assert _ask(c, "info 2") == "OK out 1 Red LED Vdd"
    assert _ask(c, "set 2 0").startswith("ERR line 2 is an output")
    rig.driver.set_direction(1, Direction.IN)
    assert _ask(c, "set 1 1") == "OK"
    assert rig.driver.get_value(1) == 1
    assert _ask(c, "info 1") == "OK in 1"
    for bad in ("get 8", "set 1 2", "set x 1", "frobnicate", "get", ""):
        assert _ask(c, bad).startswith("ERR"), bad
    assert _ask(c, "GET 1") == "OK 1"


def _wait_for(path: Path, proc: subprocess.Popen[bytes]) -> None:
    for _ in range(500):
        if path.exists():
            return
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        time.sleep(0.02)
    raise AssertionError(f"{path} did not appear")


def test_gpio_command_serves_over_vhost_user(tmp_path: Path) -> None:
    from pyvirtio.driver.vhost_user import VhostUserDriver
    from pyvirtio.spec.ids import DeviceId

    sock, ctl = tmp_path / "gpio.sock", tmp_path / "gpio.ctl"
    proc = subprocess.Popen(
        [
            *(sys.executable, "-m", "pyvirtio", "gpio", "--socket-path", str(sock), "-l", "s4"),
            *("--line-names", "a,b", "--control-socket", str(ctl)),
        ],
        stderr=subprocess.PIPE,
    )
    old_fds: list[int] = []
    try:
        _wait_for(sock, proc)
        _wait_for(ctl, proc)
        transport = VhostUserDriver(str(sock), DeviceId.GPIO)
        try:
            drv = GpioDriver(transport, wait=transport.wait_interrupt)
            assert (drv.ngpio, drv.line_names()) == (4, ["a", "b", "", ""])
            with ControlClient(str(ctl)) as c:
                drv.direction_output(0, 1)
                assert c.call("peripheral", command="get 0") == {"reply": "1"}
                drv.set_direction(3, Direction.IN)
                drv.set_irq_type(3, IrqType.EDGE_RISING)
                drv.unmask(3)
                assert c.call("peripheral", command="set 3 1") == {"reply": ""}
                assert drv.wait_events(5) == [(3, VALID, 1)]
                assert drv.get_value(3) == 1
                # The guest reboots: QEMU stops the rings and starts new ones, no reset.
                transport.stop()
                old_fds = [*transport.kick_fds, *transport.call_fds]
                for fd in transport.call_fds:
                    transport._poll.unregister(fd)
                transport.queues, transport.kick_fds, transport.call_fds = [], [], []
                again = GpioDriver(transport, wait=transport.wait_interrupt)
                assert again.get_direction(0) == Direction.NONE
                # the new guest does not drive it
                assert c.call("peripheral", command="get 0") == {"reply": "0"}
        finally:
            transport.close()
            for fd in old_fds:
                os.close(fd)
    finally:
        proc.terminate()
        assert proc.wait(10) == 0


def test_gpio_command_line_errors(tmp_path: Path) -> None:
    sock = str(tmp_path / "g.sock")
    for args in (
        ["-l", "3"],
        ["-l", "s0"],
        ["-l", "s2:s3"],
        ["--line-names", "a,a"],
        ["--model", "nosuch:Model"],
        ["--model", "pyvirtio.devices.gpio:GpioDevice"],
        ["--arg", "x=1"],
    ):
        proc = subprocess.run(
            [sys.executable, "-m", "pyvirtio", "gpio", "--socket-path", sock, *args],
            capture_output=True,
            timeout=30,
        )
        assert proc.returncode == 2, (args, proc.stderr)
        assert b"error:" in proc.stderr
    caps = subprocess.run(
        [sys.executable, "-m", "pyvirtio", "gpio", "--print-capabilities"],
        capture_output=True,
        check=True,
    )
    assert caps.stdout.strip() == b'{"type": "gpio"}'


def test_driver_refuses_another_device() -> None:
    from pyvirtio.devices.rng import RngDevice

    device = RngDevice()
    with InProcessMachine(device, memory_size=1 << 20) as machine, pytest.raises(DriverError):
        GpioDriver(machine.driver())
