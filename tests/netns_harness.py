"""Several hosts on one Linux machine, with network namespaces: a "wan" namespace holding a bridge (the
internet), hosts on public addresses plugged into it, and hosts each behind its own NAT router namespace
(nftables masquerade, nothing inbound). Every link to the bridge is shaped with `tc`: netem delay and loss
on the way out of the host, tbf rate both ways (`Shape`).

Addresses are all in 198.18.0.0/15 (the benchmarking range, RFC 2544): public hosts and routers'
WAN sides on 198.18.0.0/24, the LAN behind router j on 198.19.j.0/24. Setting up first adds
`unreachable 198.18.0.0/15` to the root namespace's routes, so no packet to a test address ever leaves
the machine by its default route.

`Network` is a context manager: leaving it (a test that fails included) kills every process it started
and every process still inside its namespaces (a DHT child or p2pd that outlived its parent), then
deletes the namespaces, which deletes their veths. Namespaces are named `inxt-<pid>-<role>`;
`sweep_leftovers()` removes those of a creator that no longer runs (a crashed earlier run).

Needs root, `ip` (iproute2) and `nft` (nftables); `unavailable()` says in words what is missing. Where the
kernel has no netem (some VMs), delay is not applied and loss is emulated with an nftables random drop;
`Network.shaping` says what was applied. What this module does not know: intellect-node (tests and
`bench/distribution.py` start the processes they need through `Network.popen` / `Network.procs`).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Self

PREFIX = "inxt-"
TEST_RANGE = "198.18.0.0/15"
WAN_SUBNET = "198.18.0"  # /24: public hosts .10+, NAT routers' WAN sides .100+


@dataclass(frozen=True)
class Shape:
    delay_ms: float = 40.0  # one way, added on the way out of each host (RTT between two hosts: 2x)
    loss_pct: float = 0.5  # on the way out of each host
    rate_mbit: float = 100.0  # each direction of each link

    @staticmethod
    def none() -> Shape:
        return Shape(0.0, 0.0, 0.0)


@dataclass
class Host:
    name: str
    ns: str
    ip: str  # the address the host uses (private behind a NAT)
    public_ip: str  # where the internet sees it: its own ip, or its router's WAN address
    router_ns: str | None = None  # the NAT router's namespace, None for a public host
    wan_link: tuple[str, str] = ("", "")  # (namespace, interface) of the host's or router's WAN side

    @property
    def behind_nat(self) -> bool:
        return self.router_ns is not None

    def cmd(self, *argv: str) -> list[str]:
        return ["ip", "netns", "exec", self.ns, *argv]


def unavailable() -> str | None:
    """Why the namespace tests cannot run here, or None when they can."""
    if os.geteuid() != 0:
        return "network namespaces need root (CI runs as root)"
    for tool, package in (("ip", "iproute2"), ("tc", "iproute2"), ("nft", "nftables")):
        if shutil.which(tool) is None:
            return f"`{tool}` is missing: apt-get install {package} (./install.sh --dev does it)"
    probe = f"{PREFIX}{os.getpid()}-probe"
    try:
        _sh("ip", "netns", "add", probe)
    except subprocess.CalledProcessError as e:
        return f"`ip netns add` fails here: {e.stderr.strip()}"
    _sh("ip", "netns", "del", probe, check=False)
    return None


def _sh(*argv: str, check: bool = True, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(argv, input=stdin, capture_output=True, text=True, timeout=30, check=check)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def pids_in(ns: str) -> list[int]:
    """Processes inside namespace `ns` (zombies not counted)."""
    pids = []
    for pid in _sh("ip", "netns", "pids", ns, check=False).stdout.split():
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] != "Z":
                    pids.append(int(pid))
        except (OSError, IndexError):
            pass
    return pids


def _kill_inside(ns: str) -> None:
    """SIGKILL every process still inside namespace `ns` (all of them were started in it by us)."""
    for pid in pids_in(ns):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def sweep_leftovers() -> list[str]:
    """Delete namespaces named by this harness whose creating process is gone; returns their names."""
    removed = []
    for line in _sh("ip", "netns", "list", check=False).stdout.splitlines():
        name = line.split()[0] if line.split() else ""
        if not name.startswith(PREFIX):
            continue
        pid = name[len(PREFIX):].split("-", 1)[0]
        if pid.isdigit() and _alive(int(pid)) and int(pid) != os.getpid():
            continue  # another live run's namespace
        if pid.isdigit() and int(pid) == os.getpid():
            continue  # ours; `Network.close` owns it
        _kill_inside(name)
        _sh("ip", "netns", "del", name, check=False)
        removed.append(name)
    return removed


def guard_test_range() -> None:
    """No packet to 198.18.0.0/15 may leave by the root namespace's default route."""
    _sh("ip", "route", "replace", "unreachable", TEST_RANGE)


class Network:
    """One wan bridge and the hosts added to it. Use as `with Network(workdir) as net:`."""

    def __init__(self, workdir: Path, shape: Shape = Shape()) -> None:
        self.workdir = Path(workdir)
        self.shape = shape
        self.tag = f"{PREFIX}{os.getpid()}-{os.urandom(2).hex()}"
        self.namespaces: list[str] = []
        self.hosts: dict[str, Host] = {}
        self.shaping: dict = {}
        self._popen: list[subprocess.Popen] = []
        self._next_public, self._next_lan, self._link = 10, 1, 0
        self._netem: bool | None = None
        self.procs = _NetnsProcs(self.workdir, self)

    # ---- set-up ---------------------------------------------------------------------------------

    def __enter__(self) -> Self:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def start(self) -> None:
        guard_test_range()
        sweep_leftovers()
        self.wan = self._ns("wan")
        self._ip(self.wan, "link", "add", "br0", "type", "bridge")
        self._ip(self.wan, "link", "set", "br0", "up")

    def _ns(self, role: str) -> str:
        name = f"{self.tag}-{role}"
        _sh("ip", "netns", "add", name)
        self.namespaces.append(name)
        self._ip(name, "link", "set", "lo", "up")
        return name

    @staticmethod
    def _ip(ns: str, *args: str) -> None:
        _sh("ip", "-n", ns, *args)

    def _plug(self, ns: str, ip: str) -> tuple[str, str]:
        """A veth from `ns` (eth0, address ip/24) to the wan bridge, shaped both ways."""
        self._link += 1
        peer = f"w{self._link}"
        _sh("ip", "link", "add", "eth0", "netns", ns, "type", "veth", "peer", "name", peer, "netns", self.wan)
        self._ip(ns, "addr", "add", f"{ip}/24", "dev", "eth0")
        self._ip(ns, "link", "set", "eth0", "up")
        self._ip(self.wan, "link", "set", peer, "master", "br0")
        self._ip(self.wan, "link", "set", peer, "up")
        self._shape(ns, "eth0", outbound=True)
        self._shape(self.wan, peer, outbound=False)
        return ns, "eth0"

    def _has_netem(self, ns: str, dev: str) -> bool:
        if self._netem is None:  # probe once: some kernels (VMs) are built without sch_netem
            probe = _sh("tc", "-n", ns, "qdisc", "add", "dev", dev, "root", "netem", "delay", "1ms", check=False)
            self._netem = probe.returncode == 0
            _sh("tc", "-n", ns, "qdisc", "del", "dev", dev, "root", check=False)
        return self._netem

    def _shape(self, ns: str, dev: str, outbound: bool) -> None:
        s = self.shape
        parent = ["root"]
        if outbound and (s.delay_ms or s.loss_pct):
            if self._has_netem(ns, dev):
                _sh("tc", "-n", ns, "qdisc", "add", "dev", dev, "root", "handle", "1:", "netem",
                    "delay", f"{s.delay_ms}ms", "loss", f"{s.loss_pct}%")
                parent = ["parent", "1:1"]
                self.shaping.update(delay_ms=s.delay_ms, loss_pct=s.loss_pct, loss_by="netem")
            else:
                self.shaping.update(delay_ms=0.0, delay_note="this kernel has no netem: no delay applied")
                if s.loss_pct:
                    per_mille = max(1, round(s.loss_pct * 10))
                    _sh("ip", "netns", "exec", ns, "nft", "-f", "-", stdin=(
                        "table inet shape {\n chain egress_loss {\n"
                        "  type filter hook postrouting priority 0; policy accept;\n"
                        f'  oifname "{dev}" numgen random mod 1000 < {per_mille} drop\n }}\n}}\n'))
                    self.shaping.update(loss_pct=per_mille / 10, loss_by="nftables random drop")
        if s.rate_mbit:
            # burst: two timer ticks' worth at 250 Hz (tbf needs at least one); latency bounds the queue
            burst = max(32_000, int(s.rate_mbit * 1e6 / 8 / 250) * 2)
            _sh("tc", "-n", ns, "qdisc", "add", "dev", dev, *parent, "handle", "10:", "tbf",
                "rate", f"{s.rate_mbit}mbit", "burst", str(burst), "latency", "200ms")
            self.shaping["rate_mbit"] = s.rate_mbit

    def add_public(self, name: str) -> Host:
        ns = self._ns(name)
        ip = f"{WAN_SUBNET}.{self._next_public}"
        self._next_public += 1
        host = Host(name, ns, ip, ip, wan_link=self._plug(ns, ip))
        self.hosts[name] = host
        return host

    def add_natted(self, name: str) -> Host:
        """A host on 198.19.j.2 behind router namespace j: masquerade out, nothing new in."""
        j = self._next_lan
        self._next_lan += 1
        router, ns = self._ns(f"{name}-nat"), self._ns(name)
        wan_ip, gw, ip = f"{WAN_SUBNET}.{99 + j}", f"198.19.{j}.1", f"198.19.{j}.2"
        link = self._plug(router, wan_ip)
        _sh("ip", "link", "add", "eth0", "netns", ns, "type", "veth", "peer", "name", "lan0", "netns", router)
        self._ip(router, "addr", "add", f"{gw}/24", "dev", "lan0")
        self._ip(router, "link", "set", "lan0", "up")
        self._ip(ns, "addr", "add", f"{ip}/24", "dev", "eth0")
        self._ip(ns, "link", "set", "eth0", "up")
        self._ip(ns, "route", "add", "default", "via", gw)
        _sh("ip", "netns", "exec", router, "sysctl", "-qw", "net.ipv4.ip_forward=1")
        _sh("ip", "netns", "exec", router, "nft", "-f", "-", stdin=(
            "table ip nat {\n chain masq {\n  type nat hook postrouting priority 100; policy accept;\n"
            '  oifname "eth0" masquerade\n }\n}\n'
            "table inet router {\n"
            " chain lan_out {\n  type filter hook forward priority 0; policy drop;\n"
            '  ct state established,related accept\n  iifname "lan0" oifname "eth0" accept\n }\n'
            " chain no_inbound {\n  type filter hook input priority 0; policy accept;\n"
            '  iifname "eth0" ct state new drop\n }\n}\n'))
        host = Host(name, ns, ip, wan_ip, router_ns=router, wan_link=link)
        self.hosts[name] = host
        return host

    # ---- faults ---------------------------------------------------------------------------------

    def link(self, host: Host, up: bool) -> None:
        """Pull (or plug back) the host's cable to the internet (its router's, behind a NAT)."""
        ns, dev = host.wan_link
        self._ip(ns, "link", "set", dev, "up" if up else "down")

    # ---- processes ------------------------------------------------------------------------------

    def popen(self, host: Host, argv: list[str], **kwargs) -> subprocess.Popen:
        """A process inside the host's namespace (own session); killed by `close`."""
        proc = subprocess.Popen(host.cmd(*argv), start_new_session=True, **kwargs)
        self._popen.append(proc)
        return proc

    def close(self) -> None:
        self.procs.close()
        for proc in self._popen:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            proc.wait()
        for ns in self.namespaces:
            _kill_inside(ns)
        deadline = time.monotonic() + 10
        for ns in reversed(self.namespaces):
            while pids_in(ns) and time.monotonic() < deadline:
                time.sleep(0.1)
            _sh("ip", "netns", "del", ns, check=False)
        self.namespaces.clear()


@dataclass
class _NetnsProcs:
    """`tests.cli_harness.Procs` whose `start` takes a host: the command runs inside its namespace."""

    workdir: Path
    net: Network
    _inner: object = field(init=False)

    def __post_init__(self) -> None:
        from tests.cli_harness import Procs

        self._inner = Procs(self.workdir)

    def start(self, host: Host, name: str, cmd: list[str], env: dict[str, str] | None = None):
        return self._inner.start(name, host.cmd(*cmd), env=env)

    def __getattr__(self, attr):
        return getattr(self._inner, attr)


def wait_json(path: Path, timeout: float, log: Path, proc: subprocess.Popen) -> dict:
    """The JSON a worker process writes to `path` when it is ready, or AssertionError with its log's tail
    (and its exit code) if it exits or `timeout` passes first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if path.exists():
            return json.loads(path.read_text())
        time.sleep(0.1)
    raise AssertionError(f"{path.name} not written in {timeout:.0f} s (exit {proc.poll()}): {log.read_text()[-4000:]}")


def namespaces_left(tag: str) -> list[str]:
    return [ln.split()[0] for ln in _sh("ip", "netns", "list", check=False).stdout.splitlines()
            if ln.split() and ln.split()[0].startswith(tag)]
