"""hivemind backend of the swarm: one libp2p daemon (hivemind's bundled p2pd) shared by a hivemind.DHT
(in its own process, as hivemind runs it) and by our request/stream handlers (a replica client of the
same daemon, on an event loop in a background thread of this process).

The daemon's libp2p key is our Ed25519 node key, so a libp2p peer id and a node key name the same peer
and every connection is authenticated as that key. hivemind is imported here and only here.

Our DHT stores only this run's sealed records (`RunRecordValidator`, the rules of `keys`): hivemind asks
it before storing what a peer sends and before using what a peer returns, so junk, plain values, records
of other keys or runs and expirations past `max_record_ttl_s` never enter an honest peer's storage.

Request handlers take at most `max_in_flight` requests at once, 2 and 4 a second per caller (`framing.InFlight`);
more are refused with `busy` before their bytes are read, a caller past its own limits a second later.

Streams use protocol id `intellect.<name>` and the framing of `framing`.

Relays (`relay.py`): every listening peer forwards `swarm.relay` requests to peers connected to it, so a
node behind a NAT with `use_auto_relay` is reached through its bootstrap peers, which it names in its
announcements (`Swarm.relay_addrs`) once the dial-back check finds it behind the NAT. p2pd's own circuit
relay is not used for data: this p2pd resets a relayed connection after 128 KiB.

What this module does not know: what the records, requests and streams mean.
"""

from __future__ import annotations

import asyncio
import ctypes
import functools
import glob
import ipaddress
import logging
import multiprocessing as mp
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Coroutine
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout

import base58
import msgpack
from hivemind.dht.validation import DHTRecord, RecordValidatorBase

from intellect.protocol.identity import Identity
from intellect.protocol.swarm import (
    PeerKey,
    RemoteError,
    RequestHandler,
    RequestRefused,
    StreamHandler,
    Swarm,
    SwarmError,
    SwarmJoinError,
    relay,
)
from intellect.protocol.swarm.addr_book import CIRCUIT, AddrBook, dialable, relay_circuit
from intellect.protocol.swarm.config import SwarmConfig
from intellect.protocol.swarm.framing import (
    END,
    MAX_IN_FLIGHT_PER_PEER,
    PROTOCOL_PREFIX,
    REQUEST_READ_TIMEOUT_S,
    InFlight,
    answer_frames,
    backend_mismatch,
    node_key_of_bytes,
    peer_id_bytes,
    read_answer,
    read_request,
    refusal_frame,
)
from intellect.protocol.swarm.keys import (
    MAX_SEALED_BYTES,
    RecordRejected,
    dht_key,
    open_record,
    seal_record,
    verify_record,
)
from intellect.protocol.swarm.reachability import DIALBACK_RPC, parse_dialback_request, relayed_through
from intellect.protocol.wire import MAX_CLOCK_SKEW_S, Envelope

logger = logging.getLogger(__name__)

_PROTO_PREFIX = "intellect."
_REBOOTSTRAP_EVERY_S = 15.0
_DIAL_HINT_TIMEOUT_S = 5.0


def libp2p_peer_id(peer: PeerKey):
    """The libp2p PeerID of a node key (identity multihash of the protobuf public key)."""
    from hivemind.p2p import PeerID

    return PeerID(peer_id_bytes(peer))


def node_key_of(peer_id) -> PeerKey | None:
    """Inverse of libp2p_peer_id; None for peers whose libp2p key is not an Ed25519 node key."""
    return node_key_of_bytes(peer_id.to_bytes())


def _write_libp2p_key(identity: Identity, folder: str) -> str:
    from cryptography.hazmat.primitives import serialization
    from hivemind.proto import crypto_pb2

    seed = identity.private_key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                                              serialization.NoEncryption())
    data = crypto_pb2.PrivateKey(key_type=crypto_pb2.KeyType.Ed25519, data=seed + identity.public_key)
    path = os.path.join(folder, "libp2p.key")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data.SerializeToString())
    return path


class RunRecordValidator(RecordValidatorBase):
    """hivemind's check of every record a peer asks us to store or returns to us: only this run's sealed
    records (`keys.open_record`) under the key they were sealed for, expiring at most `max_ttl_s` (plus
    clock skew) from now. Refuses plain (non-subkey) values, which would block every later subkey store.

    Runs in the DHT's process; holds public data only. hivemind gives the key as its DHTID (a hash) and
    key, subkey and value as msgpack, so the record names its key and we compare hashes."""

    def __init__(self, run_id: str, coordinator_key: bytes, max_ttl_s: float) -> None:
        self.run_id, self.coordinator_key, self.max_ttl_s = run_id, coordinator_key, max_ttl_s
        self.num_refused = mp.Value("q", 0)  # shared memory: validate() runs in the DHT's forked process

    def __getstate__(self) -> dict:  # a pickled copy counts on its own (the forked DHT shares ours)
        return {k: v for k, v in self.__dict__.items() if k != "num_refused"}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state, num_refused=mp.Value("q", 0))

    def validate(self, record: DHTRecord) -> bool:
        try:
            self.check(record)
        except RecordRejected as e:
            logger.debug("refused a DHT record: %s", e)
            with self.num_refused.get_lock():
                self.num_refused.value += 1
            return False
        return True

    def check(self, record: DHTRecord) -> str:
        """The record's key name, or RecordRejected with the reason."""
        from hivemind.dht.routing import DHTID
        from hivemind.utils import get_dht_time

        subkey = _unpack_small(record.subkey)
        if subkey is None:
            raise RecordRejected("no_subkey", "plain values are not stored (they would block subkey records)")
        key, _ = open_record(_unpack_small(record.value, MAX_SEALED_BYTES), subkey=subkey,
                             expiration=record.expiration_time, run_id=self.run_id,
                             coordinator_key=self.coordinator_key,
                             max_expiration=get_dht_time() + self.max_ttl_s + MAX_CLOCK_SKEW_S)
        if DHTID.generate(source=dht_key(self.run_id, key)).to_bytes() != record.key:
            raise RecordRejected("wrong_key", f"record sealed for {key!r} stored under another key")
        return key

    def merge_with(self, other: RecordValidatorBase) -> bool:
        return False


def _unpack_small(data: bytes, max_bytes: int = 256) -> object:
    """One msgpack scalar as hivemind serialized it (bin, str or nil); anything else is a refusal."""
    if not isinstance(data, bytes) or len(data) > max_bytes + 8:
        raise RecordRejected("bad_record", "oversized or not bytes")
    try:
        return msgpack.unpackb(data, raw=False, max_bin_len=max_bytes, max_str_len=max_bytes, max_array_len=0,
                               max_map_len=0, max_ext_len=0)
    except Exception as e:  # noqa: BLE001 -- msgpack raises many types on garbage
        raise RecordRejected("bad_record", f"not a msgpack scalar ({type(e).__name__})") from None


def _net_errors() -> tuple[type[BaseException], ...]:
    from hivemind.p2p import P2PDaemonError, P2PHandlerError

    return (asyncio.IncompleteReadError, asyncio.TimeoutError, ConnectionError, OSError, EOFError,
            P2PDaemonError, P2PHandlerError)


class HivemindSwarm(Swarm):
    def __init__(self, config: SwarmConfig, identity: Identity, run_id: str, coordinator_key: bytes, dht,
                 validator: RunRecordValidator) -> None:
        self.config, self.identity, self.run_id, self.coordinator_key = config, identity, run_id, coordinator_key
        self.validator = validator
        self.stats: Counter = Counter()
        self._stats_lock = threading.Lock()
        self._dht = dht
        self._dht_lock = threading.Lock()  # DHT calls go through one mp pipe
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="swarm-loop", daemon=True)
        self._thread.start()
        self._workers = ThreadPoolExecutor(max_workers=_HANDLER_THREADS, thread_name_prefix="swarm-handler")
        self._closed = False
        self._last_rebootstrap = 0.0
        self.addr_book = AddrBook()
        self._dialback_lock = threading.Lock()
        self._p2p = self._run(dht.replicate_p2p(), timeout=config.startup_timeout_s)
        if not config.client_mode:
            self.register_request_handler(DIALBACK_RPC, self._rpc_dialback, max_request_bytes=4096)
            self._register(relay.RELAY_RPC, self._relay, relay.MAX_REQUEST_BYTES,
                           InFlight(relay.MAX_IN_FLIGHT, MAX_IN_FLIGHT_PER_PEER))

    # ---- start-up -------------------------------------------------------------------------------

    @classmethod
    def start(cls, config: SwarmConfig, identity: Identity, run_id: str, coordinator_key: bytes) -> HivemindSwarm:
        keydir = tempfile.mkdtemp(prefix="intellect-p2p-")
        validator = RunRecordValidator(run_id, coordinator_key, config.max_record_ttl_s)
        try:
            key_path = _write_libp2p_key(identity, keydir)
            dht = _join(config, key_path, validator)
        finally:
            shutil.rmtree(keydir, ignore_errors=True)
        return cls(config, identity, run_id, coordinator_key, dht, validator)

    # ---- plumbing ---------------------------------------------------------------------------------

    def _run(self, coro: Coroutine, timeout: float | None):
        future = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            return future.result(timeout)
        except FutureTimeout:
            future.cancel()
            raise SwarmError(f"timed out after {timeout:.1f} s") from None

    def _count(self, name: str, n: int = 1) -> None:
        with self._stats_lock:
            self.stats[name] += n

    def _dht_records_refused(self) -> int:
        return int(self.validator.num_refused.value)

    # ---- DHT records ------------------------------------------------------------------------------

    def publish(self, key: str, envelope: bytes, ttl_s: float) -> bool:
        from hivemind.utils import get_dht_time

        if ttl_s > self.config.max_record_ttl_s:
            raise ValueError(f"a ttl of {ttl_s:.0f} s exceeds swarm.max_record_ttl_s "
                             f"({self.config.max_record_ttl_s:.0f} s): peers would refuse the record")
        expiration = get_dht_time() + ttl_s
        record = seal_record(self.identity, self.run_id, key, bytes(envelope), expiration)
        with self._dht_lock:
            future = self._dht.store(dht_key(self.run_id, key), record, expiration,
                                     subkey=self.identity.public_key_hex, return_future=True)
        ok = bool(future.result(timeout=max(30.0, ttl_s)))
        self._count("records_published" if ok else "records_publish_failed")
        return ok

    def read(self, key: str) -> list[Envelope]:
        with self._dht_lock:
            future = self._dht.get(dht_key(self.run_id, key), latest=True, return_future=True)
        found = future.result(timeout=60.0)
        if found is None:
            self.rebootstrap_soon()
            return []
        if not isinstance(found.value, dict):
            self._count("rejected_no_subkey")
            self._count("records_rejected")
            return []
        envelopes = []
        with self._stats_lock:
            for subkey, item in found.value.items():
                envelope = verify_record(key, subkey, getattr(item, "value", None),
                                         getattr(item, "expiration_time", None), run_id=self.run_id,
                                         coordinator_key=self.coordinator_key, stats=self.stats)
                if envelope is not None:
                    envelopes.append(envelope)
        return envelopes

    def rebootstrap_soon(self) -> None:
        """Swarm.rebootstrap_soon: pings the bootstrap peers from the DHT process, so both routing tables
        hold each other again. Called when a read finds nothing, and by a node whose batch was stale."""
        now = time.monotonic()
        addrs = self.rebootstrap_addrs()
        if not addrs or now - self._last_rebootstrap < _REBOOTSTRAP_EVERY_S:
            return
        self._last_rebootstrap = now
        with self._dht_lock:
            self._dht.run_coroutine(functools.partial(_ping_peers, addrs), return_future=True)
        self._count("rebootstraps")

    # ---- handlers ---------------------------------------------------------------------------------

    def register_request_handler(self, name: str, fn: RequestHandler, max_request_bytes: int = 65536,
                                 max_in_flight: int = 8) -> None:
        async def one_answer(peer: PeerKey, request: bytes):
            yield await self._loop.run_in_executor(self._workers, fn, peer, request)

        self._register(name, one_answer, max_request_bytes, InFlight(max_in_flight, MAX_IN_FLIGHT_PER_PEER))

    def register_stream_handler(self, name: str, fn: StreamHandler, max_request_bytes: int = 4096) -> None:
        self._register(name, fn, max_request_bytes, None)  # stream handlers bound their own work (upload slots)

    def _register(self, name: str, fn: StreamHandler, max_request_bytes: int, in_flight: InFlight | None) -> None:
        async def handle(info, reader, writer) -> None:
            await self._serve(name, fn, max_request_bytes, in_flight, info, reader, writer)

        self._run(self._p2p.add_binary_stream_handler(_PROTO_PREFIX + name, handle), timeout=30.0)

    async def _serve(self, name, fn, max_request_bytes, in_flight, info, reader, writer) -> None:
        """Run one handler on one incoming stream. Never raises: every failure is answered or counted."""
        peer = node_key_of(info.peer_id)
        admitted = False
        try:
            if peer is None:
                raise RequestRefused("bad_request", "caller does not use an Ed25519 node key")
            if in_flight is not None:
                await in_flight.admit(peer, asyncio.sleep)
                admitted = True
            request = await asyncio.wait_for(read_request(reader.readexactly, max_request_bytes),
                                             REQUEST_READ_TIMEOUT_S)
            async for chunk in fn(peer, request):
                if chunk:
                    writer.write(len(chunk).to_bytes(4, "big"))
                    writer.write(chunk)
                    await writer.drain()
            writer.write(END.to_bytes(4, "big"))
            await writer.drain()
            self._count(f"served_{name}")
        except RequestRefused as e:
            self._count(f"refused_{name}_{e.code}")
            writer.write(refusal_frame(e.code, e.detail))
            await _drain_quietly(writer)
            await _discard_unread(reader)
        except _net_errors():
            self._count(f"aborted_{name}")
        except Exception:  # a bug in a handler must not take the swarm down; answer, count and log it
            logger.exception("handler %s failed", name)
            self._count("handler_errors")
            writer.write(refusal_frame("internal", "handler failed"))
            await _drain_quietly(writer)
        finally:
            if admitted:
                in_flight.leave(peer)
            writer.close()

    # ---- calls ------------------------------------------------------------------------------------

    def call(self, peer: PeerKey, name: str, request: bytes, timeout: float, max_bytes: int = 1 << 20) -> bytes:
        return self.stream(peer, name, request, timeout, max_bytes)

    def stream(self, peer: PeerKey, name: str, request: bytes, timeout: float, max_bytes: int) -> bytes:
        if peer == self.identity.public_key:
            raise SwarmError("refusing to call ourselves")
        future = asyncio.run_coroutine_threadsafe(
            asyncio.wait_for(self._call_stream(peer, name, request, max_bytes), timeout), self._loop)
        try:
            return future.result()
        except RemoteError:
            raise
        except SwarmError:
            raise
        except _net_errors() as e:
            raise SwarmError(f"{name} to {peer.hex()[:12]}: {type(e).__name__}: {e}") from None

    async def _call_stream(self, peer: PeerKey, name: str, request: bytes, max_bytes: int) -> bytes:
        relays = self._relays_of(peer)
        if relays and not await self._connected(peer):
            return await self._call_through(relays, peer, name, request, max_bytes)
        await self._dial_hint(peer)
        return await self._open_and_read(peer, name, request, max_bytes)

    async def _open_and_read(self, peer: PeerKey, name: str, request: bytes, max_bytes: int) -> bytes:
        _, reader, writer = await self._p2p.call_binary_stream_handler(libp2p_peer_id(peer), _PROTO_PREFIX + name)
        try:
            await _send_request(writer, request)
            return await read_answer(reader.readexactly, name, peer, max_bytes)
        finally:
            writer.close()

    async def _dial_hint(self, peer: PeerKey) -> None:
        """Connect to `peer` at the direct addresses it announced (addr_book.py), so p2pd need not find it
        by peer routing; a failure is left to the call itself."""
        addrs = dialable(self.addr_book.due(peer))
        if addrs:
            await self._connect(peer, addrs, "hint")

    async def _connect(self, peer: PeerKey, addrs: list[str], kind: str) -> bool:
        from hivemind.utils.multiaddr import Multiaddr

        try:
            await asyncio.wait_for(self._p2p._client.connect(libp2p_peer_id(peer), [Multiaddr(a) for a in addrs]),
                                   _DIAL_HINT_TIMEOUT_S)
            self._count(f"{kind}_dials_ok")
            return True
        except (TimeoutError, ValueError, *_net_errors()) as e:
            self._count(f"{kind}_dials_failed")
            logger.debug("dialling %s at %s failed: %s", peer.hex()[:12], addrs, e)
            return False

    # ---- relaying (relay.py) ----------------------------------------------------------------------

    def _relays_of(self, peer: PeerKey) -> list[tuple[PeerKey, str]]:
        """(relay key, relay address) of each relay `peer` named, if it named no direct address."""
        out = []
        for circuit in self.addr_book.relays_of(peer):
            base, _, rest = circuit.partition("/p2p/")
            key = node_key_of_bytes(base58.b58decode(rest.removesuffix(CIRCUIT)))
            if key is not None and key != self.identity.public_key:
                out.append((key, base))
        return out

    async def _connected(self, peer: PeerKey) -> bool:
        return any(node_key_of(info.peer_id) == peer for info in await self._p2p.list_peers())

    async def _call_through(self, relays, peer: PeerKey, name: str, request: bytes, max_bytes: int) -> bytes:
        """The call to `peer` carried by the first of its relays that can (relay.py)."""
        wrapped = relay.relay_request(peer, name, request, max_bytes)
        error: SwarmError | None = None
        for key, addr in relays:
            if not await self._connected(key):
                await self._connect(key, [addr], "relay")
            try:
                answer = await self._open_and_read(key, relay.RELAY_RPC, wrapped, max_bytes)
                self._count("relayed_calls_ok")
                return answer
            except RemoteError as e:
                if e.code != "not_connected":
                    raise  # the target's own answer, passed on
                error = e
            except _net_errors() as e:
                error = SwarmError(f"{name} to {peer.hex()[:12]} through {key.hex()[:12]}: {type(e).__name__}: {e}")
            self._count("relayed_calls_failed")
        raise error or SwarmError(f"{name} to {peer.hex()[:12]}: no relay")

    async def _relay(self, caller: PeerKey, request: bytes):
        """Serve `swarm.relay`: forward one stream to a peer connected to us, frame by frame."""
        target, name, inner, max_bytes = relay.parse_relay_request(request, caller, self.identity.public_key)
        if not await self._connected(target):
            raise RequestRefused("not_connected", "that peer holds no connection to this relay")
        _, reader, writer = await self._p2p.call_binary_stream_handler(libp2p_peer_id(target), _PROTO_PREFIX + name)
        try:
            await _send_request(writer, inner)
            async for chunk in answer_frames(reader.readexactly, name, target, max_bytes):
                self._count("relayed_bytes", len(chunk))
                yield chunk
        except RemoteError as e:
            raise RequestRefused(e.code, e.detail) from None
        except SwarmError as e:  # the target answered past the caller's limit, or with an oversized refusal
            raise RequestRefused("relay_failed", str(e)) from None
        finally:
            writer.close()

    # ---- peers and reachability -------------------------------------------------------------------

    def peers(self) -> list[PeerKey]:
        infos = self._run(self._p2p.list_peers(), timeout=30.0)
        return [key for key in (node_key_of(i.peer_id) for i in infos) if key is not None]

    def visible_addrs(self) -> list[str]:
        try:
            return [str(a) for a in self._run(self._p2p.get_visible_maddrs(latest=True), timeout=30.0)]
        except ValueError:  # "No multiaddrs found": p2pd may list none while its AutoNAT finds it private
            return []

    def check_reachability(self, timeout: float = 20.0):
        """Swarm.check_reachability; a node behind NAT with use_auto_relay is "relayed" through its bootstrap
        peers, which forward requests to it over the connection it holds to them (relay.py)."""
        reach = super().check_reachability(timeout)
        relays = [a for a in self.config.bootstrap if relay_circuit(a)]
        if reach.case == "behind NAT" and self.config.use_auto_relay and relays:
            self.reachability = relayed_through(self.config, reach, relays[0])
        return self.reachability

    def _rpc_dialback(self, peer: PeerKey, request: bytes) -> bytes:
        """Dial the caller back from a throwaway daemon (a new connection, not the one it came on)."""
        addrs = parse_dialback_request(request)
        if not self._dialback_lock.acquire(blocking=False):
            raise RequestRefused("busy", "one dial-back at a time")
        try:
            return self._run(self._dial_back(peer, addrs), timeout=30.0)
        finally:
            self._dialback_lock.release()

    async def _dial_back(self, peer: PeerKey, addrs: list[str]) -> bytes:
        from hivemind.p2p import P2P
        from hivemind.utils.multiaddr import Multiaddr

        remote_ips = {str(Multiaddr(str(a)).value_for_protocol("ip4")) for info in await self._p2p.list_peers()
                      if node_key_of(info.peer_id) == peer for a in info.addrs if "/ip4/" in str(a)}
        try:
            maddrs = [Multiaddr(a).decapsulate(Multiaddr(f"/p2p/{libp2p_peer_id(peer).to_base58()}"))
                      for a in addrs]
            maddrs = [m for m in maddrs if "/ip4/" in str(m) and m.value_for_protocol("ip4") in remote_ips]
        except (ValueError, TypeError) as e:
            raise RequestRefused("bad_request", f"bad multiaddr: {e}") from None
        if not maddrs:
            return b"fail: none of the addresses is on the IP you connect from"
        probe = await P2P.create(host_maddrs=[], no_listen=True, dht_mode="client", auto_nat=False)
        try:
            await asyncio.wait_for(probe._client.connect(libp2p_peer_id(peer), maddrs), 10.0)
            return b"ok"
        except _net_errors() as e:
            return f"fail: {type(e).__name__}".encode()
        finally:
            await probe.shutdown()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self._run(self._p2p.shutdown(), timeout=10.0)
        except (SwarmError, *_net_errors()):
            pass  # the daemon belongs to the DHT process, which we stop next
        self._dht.shutdown()
        try:  # handlers still running would otherwise die with the loop ("Event loop is closed")
            self._run(_cancel_pending_tasks(), timeout=5.0)
        except (SwarmError, *_net_errors()):
            pass
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5.0)
        self._workers.shutdown(wait=False, cancel_futures=True)


async def _send_request(writer, request: bytes) -> None:
    """Write one framed request; a peer may refuse and close before reading it, so a failed drain is
    left for the answer's read to report."""
    writer.write(len(request).to_bytes(4, "big") + request)
    try:
        await writer.drain()
    except _net_errors():
        pass


async def _cancel_pending_tasks() -> None:
    """Cancel every other task on this loop and wait for them to unwind (their writers close cleanly)."""
    tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


_HANDLER_THREADS = 8  # request handlers run here; InFlight bounds what waits for them


async def _ping_peers(maddrs: list[str], _dht, node) -> int:
    """In the DHT process: connect to each multiaddr (/ip4/../tcp/../p2p/ID) and ping its DHT; a ping
    puts each side in the other's routing table. Returns how many answered."""
    from hivemind.p2p import PeerID
    from hivemind.utils.multiaddr import Multiaddr

    answered = 0
    for addr in maddrs:
        try:
            maddr = Multiaddr(addr)
            peer = PeerID.from_base58(maddr.value_for_protocol("p2p"))
            await asyncio.wait_for(node.p2p._client.connect(peer, [maddr.decapsulate(Multiaddr(f"/p2p/{peer}"))]),
                                   10.0)
            answered += await node.protocol.call_ping(peer) is not None
        except (ValueError, *_net_errors()) as e:
            logger.debug("re-bootstrap through %s failed: %s", addr, e)
    return answered


async def _discard_unread(reader) -> None:
    """Read and drop what the caller is still sending (a refused request, at most 64 KiB, 0.2 s), so the
    stream closes with nothing unread: closing over unread bytes resets the stream, and the reset can
    overtake the refusal on its way to the caller, who then sees "connection lost" instead of the reason."""
    try:
        await asyncio.wait_for(reader.read(1 << 16), 0.2)
    except _net_errors():
        pass


async def _drain_quietly(writer) -> None:
    try:
        await writer.drain()
    except _net_errors():
        pass  # the caller went away; nothing to answer


# ---- no orphans -----------------------------------------------------------------------------------
# The DHT runs in a forked child that starts p2pd. If our process dies (SIGKILL, OOM), neither may
# outlive it: the child watches its parent and exits with its children; p2pd gets a parent-death signal
# so that it also goes when the DHT child is killed outright. Linux only (prctl); elsewhere the watch
# alone covers the child.

_PR_SET_PDEATHSIG = 1
_WATCH_INTERVAL_S = 0.5


def _set_parent_death_signal(sig: int = signal.SIGKILL) -> None:
    """In a child: ask the kernel to send `sig` when our parent exits (a no-op off Linux)."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, sig, 0, 0, 0)


def _die_with_parent(parent_pid: int) -> None:
    """preexec_fn of p2pd: SIGKILL when the DHT process goes (and at once if it already went)."""
    _set_parent_death_signal()
    if os.getppid() != parent_pid:
        os._exit(1)


def _kill_own_children() -> None:
    for children in glob.glob(f"/proc/{os.getpid()}/task/*/children"):
        try:
            with open(children) as f:
                pids = f.read().split()
        except OSError:
            continue
        for pid in pids:
            try:
                os.kill(int(pid), signal.SIGKILL)
            except (ProcessLookupError, ValueError):
                pass


def _watch_parent(parent_pid: int) -> None:
    """In the DHT child: exit, taking p2pd along, as soon as the process that started us is gone."""
    while os.getppid() == parent_pid:
        time.sleep(_WATCH_INTERVAL_S)
    _kill_own_children()
    os._exit(0)


def _dht_process_class():
    import hivemind

    class OwnedDHT(hivemind.DHT):
        """hivemind.DHT whose process and p2pd end with the process that started them."""

        def run(self) -> None:
            parent = self._parent_pid  # set by multiprocessing: the pid that created this Process
            threading.Thread(target=_watch_parent, args=(parent,), name="parent-watch", daemon=True).start()
            spawn = asyncio.subprocess.create_subprocess_exec  # hivemind starts p2pd through this

            def with_parent_death(*args, **kwargs):
                kwargs.setdefault("preexec_fn", functools.partial(_die_with_parent, os.getpid()))
                return spawn(*args, **kwargs)

            asyncio.subprocess.create_subprocess_exec = with_parent_death  # this forked child only
            super().run()

    return OwnedDHT


def _join(config: SwarmConfig, key_path: str, validator):
    """Start the DHT (and its daemon), retrying with backoff until one bootstrap peer answers."""
    from hivemind.p2p import P2PDaemonError

    ip_version = "ip6" if ipaddress.ip_address(config.host).version == 6 else "ip4"
    kwargs = {
        "host_maddrs": [f"/{ip_version}/{config.host}/tcp/{config.port}"], "identity_path": key_path,
        "check_if_identity_free": False, "startup_timeout": config.startup_timeout_s,
        "client_mode": config.client_mode, "use_relay": config.use_relay, "use_auto_relay": config.use_auto_relay,
        "ensure_bootstrap_success": True, "announce_maddrs": config.announce_addrs or None,
        "record_validators": [validator],
    }
    deadline = time.monotonic() + config.join_timeout_s
    delay, attempts, last_error = 1.0, 0, ""
    while True:
        attempts += 1
        dht = _dht_process_class()(initial_peers=config.bootstrap or None, start=False, **kwargs)
        try:
            dht.run_in_background(await_ready=True, timeout=config.startup_timeout_s + 30.0)
            return dht
        except P2PDaemonError as e:
            _stop_quietly(dht)
            if "bootstrap" not in str(e):  # p2pd itself exits when it reaches no bootstrap peer
                raise SwarmJoinError(f"the libp2p daemon did not start: {e}. Raise swarm.startup_timeout_s "
                                     f"(now {config.startup_timeout_s:.0f} s) on a slow machine.") from None
            last_error = str(e).rsplit(": ", 1)[-1]
        except (RuntimeError, TimeoutError, OSError) as e:  # DHTNode: no initial peer answered a ping
            _stop_quietly(dht)
            last_error = str(e)
        if attempts == 1 and config.bootstrap:
            _refuse_libp2p_peers(config)
        if not config.bootstrap or time.monotonic() + delay > deadline:
            break
        time.sleep(delay)
        delay = min(delay * 2, 15.0)
    tried = ", ".join(config.bootstrap) or "(none: starting a new swarm failed)"
    raise SwarmJoinError(f"could not join the swarm after {attempts} attempts in {config.join_timeout_s:.0f} s: "
                         f"no bootstrap peer answered. Tried: {tried}. Last error: {last_error}. Check that "
                         "these peers are running and that this machine can reach them (firewall, address).")


def _refuse_libp2p_peers(config: SwarmConfig) -> None:
    """SwarmJoinError if a bootstrap peer serves the libp2p backend's dial-back protocol: it answered
    the handshake but not our DHT because it runs the other backend (a retry would not help)."""
    from hivemind.p2p import P2P, PeerID
    from hivemind.utils.multiaddr import Multiaddr

    async def probe() -> str | None:
        p2p = await P2P.create(host_maddrs=[], no_listen=True, dht_mode="client", auto_nat=False,
                               startup_timeout=config.startup_timeout_s)
        try:
            for addr in config.bootstrap:
                try:
                    maddr = Multiaddr(addr)
                    peer = PeerID.from_base58(maddr.value_for_protocol("p2p"))
                    await asyncio.wait_for(p2p._client.connect(peer, [maddr.decapsulate(Multiaddr(f"/p2p/{peer}"))]),
                                           5.0)
                    _, _, writer = await asyncio.wait_for(p2p.call_binary_stream_handler(
                        peer, PROTOCOL_PREFIX["libp2p"] + DIALBACK_RPC), 5.0)
                    writer.close()
                    return addr
                except (ValueError, *_net_errors()):
                    continue
            return None
        finally:
            await p2p.shutdown()

    try:
        addr = asyncio.run(probe())
    except _net_errors() as e:
        logger.debug("could not probe the bootstrap peers' backend: %s", e)
        return
    if addr is not None:
        raise backend_mismatch(addr, "libp2p", "hivemind")


def _stop_quietly(dht) -> None:
    if dht.is_alive():
        dht.shutdown()
