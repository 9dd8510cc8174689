"""py-libp2p backend of the swarm: pure Python (no Go daemon). One libp2p host and its Kademlia DHT run
on a trio event loop in a background thread of this process; request handlers run in worker threads,
stream handlers (asyncio async generators, as the `Swarm` interface defines them) on an asyncio loop in
a second thread, bridged chunk by chunk.

hivemind must never be imported in a process that uses this module: both ship a protobuf file that
defines `crypto.pb.KeyType`, and the second import fails. `setup_swarm` imports only the chosen backend.

Records: py-libp2p's DHT holds one value per key, hivemind's a value per subkey. So each writer's record
lives under its own DHT key, `/intellect/<run_id>/<name>/<subkey hex>`, holding msgpack [expiration,
sealed record]. Coordinator key spaces have one writer, whose key we know; for the others a writer also
announces itself as a provider of the key, and a reader asks for the providers, then for their records
(py-libp2p only accepts a provider record from the provider itself). `RunRecordValidator` (the DHT's
namespaced validator for `intellect`, strict: no other namespace is stored) applies the rules of `keys`
before a record is stored or used, and prefers the later expiration.

Streams use protocol id `/intellect/<name>` and the framing of `framing`.

Relays (circuit relay v2). With `use_relay`, a peer that is reachable (the bootstrap peer of others, one
with announce_addrs, or one the dial-back check found public) relays for others within RELAY_LIMITS, and
a call to a peer that no direct dial reaches goes through our bootstrap peers as relays; DCUtR then tries
to turn a relayed connection into a direct one in the background (hole punching). With `use_auto_relay`
too, a node the check found behind a NAT reserves a slot on its bootstrap peers and shows
`<relay>/p2p-circuit/p2p/<us>` in visible_addrs (reachability: "relayed").

What this module does not know: what the records, requests and streams mean, and where a NATed peer
reserved when that is none of our bootstrap peers (its announced circuits are not dialled here). Listening
in client mode is not turned off (the DHT runs as a client, so we store nothing), and 0.0.0.0 is
announced as is.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import os
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator

import msgpack
import multiaddr
import trio
from libp2p import new_host
from libp2p.abc import INotifee
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.custom_types import TProtocol
from libp2p.exceptions import BaseLibp2pError
from libp2p.kad_dht.kad_dht import DHTMode, KadDHT
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo, info_from_p2p_addr
from libp2p.peer.peerstore import PeerStoreError
from libp2p.records.validator import NamespacedValidator, Validator
from libp2p.relay.circuit_v2.config import RelayConfig, RelayRole
from libp2p.relay.circuit_v2.dcutr import DCUtRProtocol
from libp2p.relay.circuit_v2.protocol import PROTOCOL_ID as HOP_PROTOCOL_ID
from libp2p.relay.circuit_v2.protocol import CircuitV2Protocol
from libp2p.relay.circuit_v2.resources import RelayLimits
from libp2p.relay.circuit_v2.transport import CircuitV2Transport
from libp2p.tools.anyio_service import background_trio_service

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
)
from intellect.protocol.swarm.addr_book import AddrBook, dialable
from intellect.protocol.swarm.config import SwarmConfig
from intellect.protocol.swarm.framing import (
    END,
    MAX_IN_FLIGHT_PER_PEER,
    PROTOCOL_PREFIX,
    REQUEST_READ_TIMEOUT_S,
    InFlight,
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
    key_space,
    open_record,
    seal_record,
    verify_record,
)
from intellect.protocol.swarm.reachability import DIALBACK_RPC, Reachability, judge, parse_dialback_request
from intellect.protocol.wire import MAX_CLOCK_SKEW_S, Envelope

logger = logging.getLogger(__name__)
# py-libp2p warns on routine events (a peer left, our validator refused a vandal's record), a screenful
# per minute on stderr (it logs there, not through our handlers); keep its errors unless LIBP2P_DEBUG
# chooses its levels
if not os.environ.get("LIBP2P_DEBUG"):
    logging.getLogger("libp2p").setLevel(logging.ERROR)

_NAMESPACE = "intellect"
_PROTO_PREFIX = PROTOCOL_PREFIX["libp2p"]
_MAX_DHT_VALUE = 1024 * 1024 - 1024  # py-libp2p's DHT refuses records over 1 MiB (with its own fields)
_MAX_PROVIDERS = 256
_QUERY_TIMEOUT_S = 5.0
_REBOOTSTRAP_EVERY_S = 15.0
_DIAL_HINT_TIMEOUT_S = 5.0
_HANDLER_THREADS = 8  # request handlers run in at most this many threads; InFlight bounds what waits
_RELAY_DIAL_TIMEOUT_S = 10.0
_RELAY_HEAD_START_S = 2.0  # a direct dial gets this long alone before a relay is tried too
_MAX_RELAYS = 2  # bootstrap peers a NATed node reserves on / a caller dials a NATed peer through
# What one relaying peer gives away (every key is free): a circuit lives at most 10 min and carries at
# most 256 MiB (a caller that needs more dials a new one), 4 circuits per reserved peer, 32 reservations
# of 5 min (refreshed by their holders while connected)
RELAY_LIMITS = RelayLimits(duration=600, data=256 << 20, max_circuit_conns=4, max_reservations=32,
                           reservation_ttl=300)


def record_dht_key(run_id: str, key: str, subkey: str) -> str:
    """The DHT key of one writer's record under `key` (`subkey`: the writer's public key hex)."""
    return f"/{dht_key(run_id, key)}/{subkey}"


def provider_key(run_id: str, key: str) -> str:
    """The key whose providers are the writers of `key` (hex of a sha256: py-libp2p takes it as bytes)."""
    return hashlib.sha256(dht_key(run_id, key).encode()).hexdigest()


def open_value(value: object) -> tuple[float, bytes]:
    """A stored DHT value -> (expiration, sealed record), or RecordRejected. Bounded before parsing."""
    if not isinstance(value, bytes) or len(value) > MAX_SEALED_BYTES + 16:
        raise RecordRejected("bad_record", "oversized or not bytes")
    try:
        fields = msgpack.unpackb(value, raw=False, max_bin_len=MAX_SEALED_BYTES, max_str_len=0, max_array_len=2,
                                 max_map_len=0, max_ext_len=0)
    except Exception as e:  # noqa: BLE001 - msgpack raises many types on garbage; all mean the same here
        raise RecordRejected("bad_record", f"not msgpack ({type(e).__name__})") from None
    if type(fields) is not list or len(fields) != 2 or type(fields[0]) is not float or type(fields[1]) is not bytes:
        raise RecordRejected("bad_record", "expected [expiration, sealed record]")
    return fields[0], fields[1]


class RunRecordValidator(Validator):
    """The DHT's check of every record a peer asks us to store or returns to us: only this run's sealed
    records (`keys.open_record`) under the DHT key of their name and signer, not expired, expiring at
    most `max_ttl_s` (plus clock skew) from now. Holds public data only."""

    def __init__(self, run_id: str, coordinator_key: bytes, max_ttl_s: float) -> None:
        self.run_id, self.coordinator_key, self.max_ttl_s = run_id, coordinator_key, max_ttl_s
        self.num_refused = 0  # validate() runs on the swarm's event loop, one thread

    def check(self, key: str, value: object) -> tuple[str, float]:
        """(the record's key name, its expiration), or RecordRejected with the reason."""
        prefix = f"/{_NAMESPACE}/{self.run_id}/"
        if not isinstance(key, str) or not key.startswith(prefix):
            raise RecordRejected("wrong_run", f"key {str(key)[:80]!r} is not of run {self.run_id}")
        name, _, subkey = key[len(prefix):].rpartition("/")
        expiration, sealed = open_value(value)
        now = time.time()
        if not math.isfinite(expiration) or expiration <= now:
            raise RecordRejected("expired", "the record's expiration has passed")
        sealed_name, _ = open_record(sealed, subkey=subkey, expiration=expiration, run_id=self.run_id,
                                     coordinator_key=self.coordinator_key,
                                     max_expiration=now + self.max_ttl_s + MAX_CLOCK_SKEW_S)
        if sealed_name != name:
            raise RecordRejected("wrong_key", f"record sealed for {sealed_name!r} stored under {name[:80]!r}")
        return name, expiration

    def validate(self, key: str, value: bytes) -> None:
        try:
            self.check(key, value)
        except RecordRejected:
            self.num_refused += 1
            raise  # py-libp2p refuses the store (and logs it)

    def select(self, key: str, values: list[bytes]) -> int:
        """The index of the value that expires last (the writer's latest); invalid ones never win."""
        def expiration(value: bytes) -> float:
            try:
                return self.check(key, value)[1]
            except RecordRejected:
                return -math.inf

        return max(range(len(values)), key=lambda i: expiration(values[i]))


class _ForgetDeparted(INotifee):
    """Drops a peer from the DHT's routing table when its last connection closes. py-libp2p keeps it,
    and every later lookup then waits out its query timeout (10 s) on a peer that is gone."""

    def __init__(self, dht: KadDHT) -> None:
        self.dht = dht

    async def disconnected(self, network, conn) -> None:
        peer = conn.muxed_conn.peer_id
        if not network.connections.get(peer):
            self.dht.routing_table.remove_peer(peer)

    async def opened_stream(self, network, stream) -> None: ...
    async def closed_stream(self, network, stream) -> None: ...
    async def connected(self, network, conn) -> None: ...
    async def listen(self, network, multiaddr) -> None: ...
    async def listen_close(self, network, multiaddr) -> None: ...


class _Relay(CircuitV2Protocol):
    """py-libp2p's circuit relay v2, reserving for the peer on the connection: py-libp2p takes the peer
    id from the RESERVE message, so one peer could fill every slot with ids it made up."""

    async def _handle_reserve(self, stream, msg) -> None:
        msg.peer.id = stream.muxed_conn.peer_id.to_bytes()
        await super()._handle_reserve(stream, msg)


def _net_errors() -> tuple[type[BaseException], ...]:
    return (BaseLibp2pError, trio.TooSlowError, trio.BrokenResourceError, trio.ClosedResourceError, OSError,
            EOFError, asyncio.IncompleteReadError)


def _exact_reader(stream):
    async def readexactly(n: int) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            chunk = await stream.read(n - len(buf))
            if not chunk:
                raise EOFError(f"stream ended after {len(buf)} of {n} bytes")
            buf += chunk
        return bytes(buf)

    return readexactly


def _listen_addr(config: SwarmConfig) -> multiaddr.Multiaddr:
    family = "ip6" if ":" in config.host else "ip4"
    return multiaddr.Multiaddr(f"/{family}/{config.host}/tcp/{config.port}")


def _key_pair(identity: Identity):
    from cryptography.hazmat.primitives import serialization

    seed = identity.private_key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                                              serialization.NoEncryption())
    return create_new_key_pair(seed)


class Libp2pSwarm(Swarm):
    def __init__(self, config: SwarmConfig, identity: Identity, run_id: str, coordinator_key: bytes) -> None:
        self.config, self.identity, self.run_id, self.coordinator_key = config, identity, run_id, coordinator_key
        self.stats: Counter = Counter()
        self._stats_lock = threading.Lock()
        self.validator = RunRecordValidator(run_id, coordinator_key, config.max_record_ttl_s)
        self._ready = threading.Event()
        self._start_error: BaseException | None = None
        self._closed = False
        self._last_rebootstrap = 0.0
        self.addr_book = AddrBook()
        self._circuit_addrs: list[str] = []  # ours, once a relay holds a reservation for us
        self._dialback_lock = threading.Lock()
        self._thread = threading.Thread(target=trio.run, args=(self._main,), name="swarm-trio", daemon=True)
        self._aloop = asyncio.new_event_loop()  # stream handlers are asyncio generators (shard_server)
        self._athread = threading.Thread(target=self._aloop.run_forever, name="swarm-asyncio", daemon=True)

    # ---- start-up -------------------------------------------------------------------------------

    @classmethod
    def start(cls, config: SwarmConfig, identity: Identity, run_id: str, coordinator_key: bytes) -> Libp2pSwarm:
        swarm = cls(config, identity, run_id, coordinator_key)
        swarm._athread.start()
        swarm._thread.start()
        if not swarm._ready.wait(config.startup_timeout_s) or swarm._start_error is not None:
            swarm.close()
            raise SwarmJoinError(f"the libp2p host did not start on {_listen_addr(config)}: "
                                 f"{swarm._start_error or 'timed out'}")
        try:
            swarm._join()
        except SwarmJoinError:
            swarm.close()
            raise
        if not config.client_mode:
            swarm.register_request_handler(DIALBACK_RPC, swarm._rpc_dialback, max_request_bytes=4096)
        return swarm

    async def _main(self) -> None:
        try:
            self._token = trio.lowlevel.current_trio_token()
            self._stop = trio.Event()
            self._limiter = trio.CapacityLimiter(_HANDLER_THREADS)
            announce = [multiaddr.Multiaddr(a) for a in self.config.announce_addrs] or None
            self._host = new_host(key_pair=_key_pair(self.identity), announce_addrs=announce)
            mode = DHTMode.CLIENT if self.config.client_mode else DHTMode.SERVER
            validator = NamespacedValidator({_NAMESPACE: self.validator}, strict_validation=True)
            self._dht = KadDHT(self._host, mode, validator=validator, validator_changed=True)
            self._host.get_network().register_notifee(_ForgetDeparted(self._dht))
            self._relay = _Relay(self._host, limits=RELAY_LIMITS) if self.config.use_relay else None
            async with self._host.run([_listen_addr(self.config)]), background_trio_service(self._dht), \
                    trio.open_nursery() as nursery:
                self._nursery = nursery
                if self._relay is not None:
                    await self._start_relay(nursery)
                self._ready.set()
                await self._stop.wait()
                with trio.move_on_after(5.0):  # peers see us leave (and drop us from their routing tables)
                    await self._host.close()
                nursery.cancel_scope.cancel()
        except BaseException as e:  # noqa: BLE001 - reported by start(); the thread ends here
            self._start_error = e
            self._ready.set()

    def _join(self) -> None:
        """Connect to a bootstrap peer, retrying with backoff until one answers or join_timeout_s passes."""
        if not self.config.bootstrap:
            return
        deadline = time.monotonic() + self.config.join_timeout_s
        delay, attempts, last_error = 0.5, 0, ""
        while True:
            attempts += 1
            answered, last_error = self._run(self._connect_bootstrap, list(self.config.bootstrap),
                                             timeout=self.config.join_timeout_s + 15)
            if answered:
                return
            if time.monotonic() + delay > deadline:
                break
            time.sleep(delay)
            delay = min(delay * 2, 15.0)
        raise SwarmJoinError(f"could not join the swarm after {attempts} attempts in "
                             f"{self.config.join_timeout_s:.0f} s: no bootstrap peer answered. Tried: "
                             f"{', '.join(self.config.bootstrap)}. Last error: {last_error}. Check that these peers "
                             "are running and that this machine can reach them (firewall, address).")

    async def _connect_bootstrap(self, addrs: list[str]) -> tuple[int, str]:
        """Dial each of `addrs` (/../p2p/<id>) and put it in the DHT's routing table; (how many answered,
        last error)."""
        answered, last_error = 0, ""
        for addr in addrs:
            try:
                info = info_from_p2p_addr(multiaddr.Multiaddr(addr))
                with trio.fail_after(10.0):
                    await self._host.connect(info)
                    await self._refuse_hivemind_peer(addr, info.peer_id)
                    await self._dht.routing_table.add_peer(info)
                answered += 1
            except (ValueError, *_net_errors()) as e:  # ValueError: a bootstrap address without /p2p/
                last_error = f"{addr}: {type(e).__name__}: {e}"
        return answered, last_error

    async def _refuse_hivemind_peer(self, addr: str, peer_id: ID) -> None:
        """SwarmJoinError if the peer serves hivemind's dial-back protocol (it runs the other backend)."""
        try:
            with trio.move_on_after(3.0):
                stream = await self._host.new_stream(peer_id, [TProtocol(PROTOCOL_PREFIX["hivemind"] + DIALBACK_RPC)])
                await _close_quietly(stream)
                raise backend_mismatch(addr, "hivemind", "libp2p")
        except _net_errors():
            return  # not a hivemind peer (or not a listening one: then we cannot tell)

    # ---- relays -----------------------------------------------------------------------------------

    async def _start_relay(self, nursery: trio.Nursery) -> None:
        """Accept relayed connections (stop), dial through relays, hole-punch them (DCUtR); relay for others
        (hop) now if we are surely reachable: the first peer (others bootstrap from it) or port-forwarded."""
        # no client role: py-libp2p would then reserve on every relay it dials through
        self._relay_transport = CircuitV2Transport(self._host, self._relay, RelayConfig(roles=RelayRole.STOP,
                                                                                       limits=RELAY_LIMITS))
        for service in (self._relay, DCUtRProtocol(self._host)):
            await nursery.start(self._keep_running, service)
        if not self.config.client_mode and (not self.config.bootstrap or self.config.announce_addrs):
            await self._start_hop()

    async def _keep_running(self, service, task_status=trio.TASK_STATUS_IGNORED) -> None:
        async with background_trio_service(service):
            task_status.started()
            await trio.sleep_forever()

    async def _start_hop(self) -> None:
        self._relay.allow_hop = True
        self._host.set_stream_handler(HOP_PROTOCOL_ID, self._relay._handle_hop_stream)

    async def _reserve(self) -> list[str]:
        """Reserve a slot on up to _MAX_RELAYS bootstrap peers; our circuit addresses there."""
        me = self._host.get_id().to_base58()
        for addr in self.config.bootstrap:
            circuit = f"{addr}/p2p-circuit/p2p/{me}"
            if len(self._circuit_addrs) >= _MAX_RELAYS or circuit in self._circuit_addrs:
                continue
            try:
                info = info_from_p2p_addr(multiaddr.Multiaddr(addr))
                with trio.fail_after(_RELAY_DIAL_TIMEOUT_S):
                    await self._host.connect(info)
                    stream = await self._host.new_stream(info.peer_id, [HOP_PROTOCOL_ID])
                    try:  # keeps refreshing it in the background while we stay connected
                        ok = await self._relay_transport.reserve(stream, info.peer_id, self._nursery)
                    finally:
                        await _close_quietly(stream)
            except (ValueError, *_net_errors()) as e:
                logger.debug("reserving on %s failed: %s", addr, e)
                ok = False
            self._count("relay_reservations_ok" if ok else "relay_reservations_failed")
            if ok:
                self._circuit_addrs.append(circuit)
        return self._circuit_addrs

    async def _dial_relayed(self, peer_id: ID) -> None:
        """Connect to `peer_id` through one of our first _MAX_RELAYS bootstrap peers (a NATed peer reserves
        on its bootstrap peers, see _reserve); BaseLibp2pError when none of them relays to it."""
        last_error: BaseException | None = None
        for addr in self.config.bootstrap[:_MAX_RELAYS]:
            try:
                relay = multiaddr.Multiaddr(addr)
                if info_from_p2p_addr(relay).peer_id == peer_id:
                    continue
                with trio.fail_after(_RELAY_DIAL_TIMEOUT_S):
                    await self._relay_transport.dial(
                        relay.encapsulate(multiaddr.Multiaddr(f"/p2p-circuit/p2p/{peer_id.to_base58()}")))
                self._count("relay_dials_ok")
                return
            except (ValueError, ConnectionError, multiaddr.exceptions.Error, *_net_errors()) as e:
                self._count("relay_dials_failed")
                last_error = e
                logger.debug("dialling %s through %s failed: %s", peer_id, addr, e)
        raise BaseLibp2pError(f"no relay reaches {peer_id}: {last_error}")

    def check_reachability(self, timeout: float = 20.0) -> Reachability:
        """Swarm.check_reachability, then: relay for others when public; with use_auto_relay, reserve on a
        relay when behind a NAT (the case becomes "relayed" once one holds a slot for us)."""
        reach = super().check_reachability(timeout)
        if self._relay is not None and reach.case == "public":
            self._run(self._start_hop, timeout=10.0)
        elif self._relay is not None and self.config.use_auto_relay and reach.case == "behind NAT" and \
                self._run(self._reserve, timeout=_RELAY_DIAL_TIMEOUT_S * (len(self.config.bootstrap) + 1)):
            self.reachability = judge(self.config, self.visible_addrs(), [])
        return self.reachability

    # ---- plumbing ---------------------------------------------------------------------------------

    def _run(self, fn, *args, timeout: float):
        """Run `fn(*args)` on the trio loop from any other thread; SwarmError after `timeout`."""
        async def bounded():
            with trio.fail_after(timeout):
                return await fn(*args)

        if self._closed or not self._thread.is_alive():
            raise SwarmError("the swarm is closed")
        try:
            return trio.from_thread.run(bounded, trio_token=self._token)
        except trio.TooSlowError:
            raise SwarmError(f"timed out after {timeout:.1f} s") from None
        except trio.RunFinishedError:
            raise SwarmError("the swarm is closed") from None

    def _count(self, name: str, n: int = 1) -> None:
        with self._stats_lock:
            self.stats[name] += n

    def _dht_records_refused(self) -> int:
        return self.validator.num_refused

    # ---- DHT records ------------------------------------------------------------------------------

    def publish(self, key: str, envelope: bytes, ttl_s: float) -> bool:
        if ttl_s > self.config.max_record_ttl_s:
            raise ValueError(f"a ttl of {ttl_s:.0f} s exceeds swarm.max_record_ttl_s "
                             f"({self.config.max_record_ttl_s:.0f} s): peers would refuse the record")
        expiration = time.time() + ttl_s
        sealed = seal_record(self.identity, self.run_id, key, bytes(envelope), expiration)
        value = msgpack.packb([expiration, sealed], use_bin_type=True)
        if len(value) > _MAX_DHT_VALUE:
            raise ValueError(f"a record of {len(value)} bytes exceeds the {_MAX_DHT_VALUE} bytes py-libp2p's DHT "
                             "stores")
        ok = self._run(self._publish, key, value, timeout=max(30.0, min(ttl_s, 120.0)))
        self._count("records_published" if ok else "records_publish_failed")
        return ok

    async def _publish(self, key: str, value: bytes) -> bool:
        try:
            await self._dht.put_value(record_dht_key(self.run_id, key, self.identity.public_key_hex), value)
            if not key_space(key).coordinator_only:
                await self._dht.provide(provider_key(self.run_id, key))
        except RecordRejected as e:
            logger.debug("our record for %s was refused: %s", key, e)
            return False
        return True

    def read(self, key: str) -> list[Envelope]:
        values = self._run(self._read, key, timeout=60.0)
        if not values:
            self.rebootstrap_soon()
        envelopes, now = [], time.time()
        with self._stats_lock:
            for subkey, value in values.items():
                try:
                    expiration, sealed = open_value(value)
                    if expiration <= now:
                        raise RecordRejected("expired", "the record's expiration has passed")
                except RecordRejected as e:
                    self.stats[f"rejected_{e.reason}"] += 1
                    self.stats["records_rejected"] += 1
                    continue
                envelope = verify_record(key, subkey, sealed, expiration, run_id=self.run_id,
                                         coordinator_key=self.coordinator_key, stats=self.stats)
                if envelope is not None:
                    envelopes.append(envelope)
        return envelopes

    async def _read(self, key: str) -> dict[str, bytes]:
        """subkey -> the raw value found for it (the writers: the coordinator, or the key's providers)."""
        if key_space(key).coordinator_only:
            writers = [self.coordinator_key]
        else:
            infos = await self._providers(bytes.fromhex(provider_key(self.run_id, key)))
            writers = list(dict.fromkeys(k for k in (node_key_of_bytes(i.peer_id.to_bytes()) for i in infos) if k))
        found: dict[str, bytes] = {}

        async def get_one(writer: PeerKey) -> None:
            try:
                value = await self._dht.get_value(record_dht_key(self.run_id, key, writer.hex()))
            except _net_errors() as e:
                logger.debug("reading %s of %s failed: %s", key, writer.hex()[:12], e)
                return
            if value is not None:
                found[writer.hex()] = value

        async with trio.open_nursery() as nursery:
            for writer in writers:
                nursery.start_soon(get_one, writer)
        return found

    async def _providers(self, key: bytes) -> list[PeerInfo]:
        """Our providers of `key` and those the closest peers hold. py-libp2p's find_providers stops at
        the local ones when there are any, but a key has many writers: we ask the network too."""
        store = self._dht.provider_store
        found = list(store.get_providers(key))
        closest = [p for p in await self._dht.peer_routing.find_closest_peers_network(key) if p != self._host.get_id()]

        async def ask(peer: ID) -> None:
            with trio.move_on_after(_QUERY_TIMEOUT_S):
                try:
                    providers, _ = await store._get_providers_from_peer_with_closers(peer, key)
                except _net_errors() as e:
                    logger.debug("asking %s for providers failed: %s", peer, e)
                    return
                found.extend(providers or [])

        async with trio.open_nursery() as nursery:
            for peer in closest:
                nursery.start_soon(ask, peer)
        return found[:_MAX_PROVIDERS]

    def rebootstrap_soon(self) -> None:
        """Swarm.rebootstrap_soon: dials the bootstrap peers on the swarm's loop. Called when a read finds
        nothing, and by a node whose batch was stale."""
        now = time.monotonic()
        addrs = self.rebootstrap_addrs()
        if not addrs or now - self._last_rebootstrap < _REBOOTSTRAP_EVERY_S:
            return
        self._last_rebootstrap = now
        trio.from_thread.run_sync(self._nursery.start_soon, self._connect_bootstrap, addrs, trio_token=self._token)
        self._count("rebootstraps")

    # ---- handlers ---------------------------------------------------------------------------------

    def register_request_handler(self, name: str, fn: RequestHandler, max_request_bytes: int = 65536,
                                 max_in_flight: int = 8) -> None:
        async def one_answer(peer: PeerKey, request: bytes) -> AsyncIterator[bytes]:
            yield await trio.to_thread.run_sync(fn, peer, request, limiter=self._limiter)

        self._register(name, one_answer, max_request_bytes, InFlight(max_in_flight, MAX_IN_FLIGHT_PER_PEER))

    def register_stream_handler(self, name: str, fn: StreamHandler, max_request_bytes: int = 4096) -> None:
        async def bridged(peer: PeerKey, request: bytes) -> AsyncIterator[bytes]:
            chunks = fn(peer, request)
            try:
                while True:
                    done, chunk = await trio.to_thread.run_sync(self._next_on_asyncio, chunks, abandon_on_cancel=True)
                    if done:
                        return
                    yield chunk
            finally:
                asyncio.run_coroutine_threadsafe(chunks.aclose(), self._aloop)

        self._register(name, bridged, max_request_bytes, None)  # stream handlers bound their own work

    def _next_on_asyncio(self, chunks) -> tuple[bool, bytes | None]:
        async def step():
            try:
                return False, await chunks.__anext__()
            except StopAsyncIteration:
                return True, None

        return asyncio.run_coroutine_threadsafe(step(), self._aloop).result()

    def _register(self, name: str, fn, max_request_bytes: int, in_flight: InFlight | None) -> None:
        async def handle(stream) -> None:
            await self._serve(name, fn, max_request_bytes, in_flight, stream)

        async def add() -> None:
            self._host.set_stream_handler(TProtocol(_PROTO_PREFIX + name), handle)

        self._run(add, timeout=10.0)

    async def _serve(self, name, fn, max_request_bytes, in_flight, stream) -> None:
        """Run one handler on one incoming stream. Never raises: every failure is answered or counted."""
        peer = node_key_of_bytes(stream.muxed_conn.peer_id.to_bytes())
        admitted = False
        try:
            if peer is None:
                raise RequestRefused("bad_request", "caller does not use an Ed25519 node key")
            if in_flight is not None:
                await in_flight.admit(peer, trio.sleep)
                admitted = True
            with trio.fail_after(REQUEST_READ_TIMEOUT_S):
                request = await read_request(_exact_reader(stream), max_request_bytes)
            async for chunk in fn(peer, request):
                if chunk:
                    await stream.write(len(chunk).to_bytes(4, "big") + bytes(chunk))
            await stream.write(END.to_bytes(4, "big"))
            self._count(f"served_{name}")
        except RequestRefused as e:
            self._count(f"refused_{name}_{e.code}")
            await _write_quietly(stream, refusal_frame(e.code, e.detail))
        except _net_errors():
            self._count(f"aborted_{name}")
        except Exception:  # a bug in a handler must not take the swarm down; answer, count and log it
            logger.exception("handler %s failed", name)
            self._count("handler_errors")
            await _write_quietly(stream, refusal_frame("internal", "handler failed"))
        finally:
            if admitted:
                in_flight.leave(peer)
            await _close_quietly(stream)

    # ---- calls ------------------------------------------------------------------------------------

    def call(self, peer: PeerKey, name: str, request: bytes, timeout: float, max_bytes: int = 1 << 20) -> bytes:
        return self.stream(peer, name, request, timeout, max_bytes)

    def stream(self, peer: PeerKey, name: str, request: bytes, timeout: float, max_bytes: int) -> bytes:
        if peer == self.identity.public_key:
            raise SwarmError("refusing to call ourselves")
        try:
            return self._run(self._call_stream, peer, name, request, max_bytes, timeout=timeout)
        except (RemoteError, SwarmError):
            raise
        except _net_errors() as e:
            raise SwarmError(f"{name} to {peer.hex()[:12]}: {type(e).__name__}: {e}") from None

    async def _call_stream(self, peer: PeerKey, name: str, request: bytes, max_bytes: int) -> bytes:
        peer_id = ID(peer_id_bytes(peer))
        # the direct addresses it announced (addr_book.py): no peer routing needed (host.connect drops relay
        # circuits; _connect_or_relay tries our bootstrap peers as relays)
        hint = dialable(self.addr_book.due(peer)) if peer_id not in self._host.get_connected_peers() else []
        if hint:
            try:
                with trio.fail_after(_DIAL_HINT_TIMEOUT_S):
                    await self._host.connect(PeerInfo(peer_id, [multiaddr.Multiaddr(a) for a in hint]))
                self._count("hint_dials_ok")
            except (ValueError, multiaddr.exceptions.Error, *_net_errors()) as e:
                self._count("hint_dials_failed")
                logger.debug("dialling %s at %s failed: %s", peer.hex()[:12], hint, e)
        if self._relay is not None and peer_id not in self._host.get_connected_peers():
            await self._connect_or_relay(peer_id)
        elif peer_id not in self._host.get_connected_peers() and not self._host.get_peerstore().addrs(peer_id):
            found = await self._dht.find_peer(peer_id)  # a peer we only know from a record
            if found is not None:
                await self._host.connect(found)
        stream = await self._host.new_stream(peer_id, [TProtocol(_PROTO_PREFIX + name)])
        try:
            await stream.write(len(request).to_bytes(4, "big") + request)
            return await read_answer(_exact_reader(stream), name, peer, max_bytes)
        finally:
            await _close_quietly(stream)

    async def _connect_or_relay(self, peer_id: ID) -> None:
        """Dial `peer_id` directly (where the peerstore or peer routing says it is) and, from
        _RELAY_HEAD_START_S on, through a relay too: the first connection wins. A NATed peer's own
        addresses are private, and a dial there only times out."""
        errors: list[BaseException] = []

        async def direct() -> None:
            with trio.fail_after(_RELAY_DIAL_TIMEOUT_S):
                addrs = [a for a in _known_addrs(self._host, peer_id) if "/p2p-circuit" not in str(a)]
                info = PeerInfo(peer_id, addrs) if addrs else await self._dht.find_peer(peer_id)
                if info is None:
                    raise BaseLibp2pError("peer routing does not know it")
                await self._host.connect(info)

        async def relayed() -> None:
            await trio.sleep(_RELAY_HEAD_START_S)
            await self._dial_relayed(peer_id)

        async with trio.open_nursery() as nursery:
            async def attempt(dial) -> None:
                try:
                    await dial()
                    nursery.cancel_scope.cancel()
                except (PeerStoreError, *_net_errors()) as e:
                    errors.append(e)

            nursery.start_soon(attempt, direct)
            nursery.start_soon(attempt, relayed)
        if len(errors) == 2:
            raise BaseLibp2pError(f"neither a direct dial nor a relay reaches {peer_id}: {errors[0]}; {errors[1]}")

    # ---- peers and reachability -------------------------------------------------------------------

    def peers(self) -> list[PeerKey]:
        async def connected() -> list[ID]:
            return list(self._host.get_connected_peers())

        return [k for k in (node_key_of_bytes(p.to_bytes()) for p in self._run(connected, timeout=10.0)) if k]

    def visible_addrs(self) -> list[str]:
        async def addrs() -> list[str]:
            return [str(a) for a in self._host.get_addrs()] + self._circuit_addrs

        return self._run(addrs, timeout=10.0)

    def _rpc_dialback(self, peer: PeerKey, request: bytes) -> bytes:
        """Dial the caller back from a throwaway host (a new connection, not the one it came on)."""
        addrs = parse_dialback_request(request)
        if not self._dialback_lock.acquire(blocking=False):
            raise RequestRefused("busy", "one dial-back at a time")
        try:
            return self._run(self._dial_back, peer, addrs, timeout=30.0)
        finally:
            self._dialback_lock.release()

    async def _dial_back(self, peer: PeerKey, addrs: list[str]) -> bytes:
        peer_id = ID(peer_id_bytes(peer))
        remote_ips = set()
        for conn in self._host.get_network().connections.get(peer_id, []):
            remote = conn.muxed_conn.get_remote_address()
            if remote:
                remote_ips.add(remote[0])
        try:  # only the IP the caller connects from: we never dial a third party for it
            maddrs = [multiaddr.Multiaddr(a).decapsulate(multiaddr.Multiaddr(f"/p2p/{peer_id.to_base58()}"))
                      for a in addrs]
            maddrs = [m for m in maddrs if "/ip4/" in str(m) and m.value_for_protocol("ip4") in remote_ips]
        except (ValueError, TypeError, multiaddr.exceptions.Error) as e:
            raise RequestRefused("bad_request", f"bad multiaddr: {e}") from None
        if not maddrs:
            return b"fail: none of the addresses is on the IP you connect from"
        probe = new_host(key_pair=create_new_key_pair())
        try:
            async with probe.run([]):
                try:
                    with trio.fail_after(10.0):
                        await probe.connect(PeerInfo(peer_id, maddrs))
                    return b"ok"
                finally:  # leave cleanly: the caller drops the probe from its routing table at once
                    with trio.move_on_after(3.0):
                        await probe.close()
        except _net_errors() as e:
            return f"fail: {type(e).__name__}".encode()

    def close(self) -> None:
        if self._closed:
            return
        if self._thread.is_alive() and self._ready.is_set() and self._start_error is None:
            try:
                trio.from_thread.run_sync(self._stop.set, trio_token=self._token)
            except trio.RunFinishedError:
                pass
        self._closed = True
        self._thread.join(timeout=10.0)
        self._aloop.call_soon_threadsafe(self._aloop.stop)
        self._athread.join(timeout=5.0)


def _known_addrs(host, peer_id: ID) -> list[multiaddr.Multiaddr]:
    try:
        return host.get_peerstore().addrs(peer_id)
    except PeerStoreError:  # a peer it never heard of
        return []


async def _write_quietly(stream, data: bytes) -> None:
    try:
        await stream.write(data)
    except _net_errors():
        pass  # the caller went away; nothing to answer


async def _close_quietly(stream) -> None:
    try:
        await stream.close()
    except _net_errors():
        pass
