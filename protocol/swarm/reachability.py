"""The dial-back reachability check, the part both backends share: the request a node sends (its direct
addresses), how a peer parses it, and how the node names its case from the answers.

A node asks up to two connected peers to dial it back from a fresh connection: public (dialled),
relayed (not dialled, but it holds a relay address, or a bootstrap peer forwards to it: `relayed_through`), behind NAT
(neither), client mode (it does not listen), unknown (no peer to ask yet).

What this module does not know: how a peer dials (that is the backend).
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass

import msgpack

from intellect.protocol.swarm import RemoteError, RequestRefused, SwarmError
from intellect.protocol.swarm.config import SwarmConfig

DIALBACK_RPC = "swarm.dialback"
MAX_DIALBACK_ADDRS = 8
RELAY_ADVICE = "works, but every byte goes through the relay: forward TCP port {port} for direct connections"


@dataclass(frozen=True)
class Reachability:
    reachable: bool | None  # None: could not tell (no peer to ask)
    detail: str
    advice: str
    case: str = "unknown"  # public | relayed | behind NAT | client mode | unknown

    @property
    def line(self) -> str:
        """One line for the status screen: the case first, then what we saw and what to do."""
        return f"{self.case}: {self.detail}" + (f". {self.advice}" if self.advice else "")


CLIENT_MODE = Reachability(False, "this node only dials out", "fine for downloading, generating and submitting; "
                           "to serve shards too, open the port and drop client_mode", "client mode")


def dialback_request(addrs: list[str]) -> bytes:
    return msgpack.packb([a for a in addrs if "/p2p-circuit" not in a][:MAX_DIALBACK_ADDRS], use_bin_type=True)


def parse_dialback_request(request: bytes) -> list[str]:
    """The multiaddrs a caller asks us to dial, or RequestRefused(bad_request)."""
    try:
        addrs = msgpack.unpackb(request, raw=False, max_array_len=MAX_DIALBACK_ADDRS, max_str_len=256,
                                max_bin_len=0, max_map_len=0)
    except (ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError):
        raise RequestRefused("bad_request", "expected a msgpack list of multiaddrs") from None
    if type(addrs) is not list or not all(type(a) is str for a in addrs):
        raise RequestRefused("bad_request", "expected a list of multiaddr strings")
    return addrs


def judge(config: SwarmConfig, addrs: list[str], answers: list[str]) -> Reachability:
    """Name our case from our visible addresses and the peers' dial-back answers ("ok" or why not)."""
    relayed = [a for a in addrs if "/p2p-circuit" in a]
    direct = [a for a in addrs if "/p2p-circuit" not in a]
    port = config.port or "(the port in your addresses)"
    if any(a == "ok" for a in answers):
        return Reachability(True, f"peers can dial {', '.join(direct)}", "", "public")
    if relayed:
        return Reachability(True, f"peers reach us through a relay ({relayed[0]})", RELAY_ADVICE.format(port=port),
                            "relayed")
    if not answers:
        return Reachability(None, "no peer to ask yet", "")
    return Reachability(False, f"peers could not dial {', '.join(direct) or 'us (no address listed)'} "
                        f"({'; '.join(answers)})",
                        "downloading, generating and submitting still work (they dial out), but only "
                        "peers we dialled can fetch shards from us. To serve everyone: forward TCP port {port} in your router (fix "
                        "swarm.port, set announce_addrs to /ip4/<public ip>/tcp/<port>), or set "
                        "use_auto_relay = true to be reached through a relay; or set client_mode = true "
                        "to stop trying", "behind NAT")


def relayed_through(config: SwarmConfig, behind_nat: Reachability, relay: str) -> Reachability:
    """"relayed", for a node `behind_nat` whose bootstrap peer `relay` forwards requests to it over the
    connection the node holds to it (the hivemind backend's forwarding relay, relay.py)."""
    port = config.port or "(the port in your addresses)"
    return Reachability(True, f"{behind_nat.detail}; peers reach us through a relay ({relay}), which forwards "
                        "their requests over our connection to it", RELAY_ADVICE.format(port=port), "relayed")


def ask_for_dialback(swarm, timeout: float) -> Reachability:
    """Ask up to two of `swarm`'s connected peers to dial it back, and name its case from their answers."""
    if swarm.config.client_mode:
        return CLIENT_MODE
    addrs = swarm.visible_addrs()
    deadline = time.monotonic() + timeout
    answers = []
    for peer in swarm.peers()[:2]:
        while True:
            try:
                answers.append(swarm.call(peer, DIALBACK_RPC, dialback_request(addrs), timeout=timeout)
                               .decode(errors="replace"))
            except RemoteError as e:
                # busy: the peer is dialling someone else back (it does one at a time, and a coordinator
                # sees many nodes join at once); that says nothing about us, so ask again
                if e.code == "busy" and time.monotonic() + 1.0 < deadline:
                    time.sleep(random.uniform(0.2, 1.0))
                    continue
                if e.code != "busy":
                    answers.append(f"error: {e}")
            except SwarmError as e:
                answers.append(f"error: {e}")
            break
    return judge(swarm.config, addrs, answers)
