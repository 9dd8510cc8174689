"""The peers a node has heard of, kept in its state dir (`known_peers.json`): a restarted node whose
bootstrap peer (the coordinator's address in run.toml) does not answer joins through them, and a running
node re-bootstraps from them as well as from its bootstrap peers.

The book holds what peers signed about themselves in their announcements (protocol/swarm/addr_book.py),
newest last; it is read back with the same bounds as any wire input.

What this module does not know: how the swarm dials (protocol/swarm) or when the node saves (app.py).
"""

from __future__ import annotations

import logging
from pathlib import Path

from intellect.protocol.identity import Identity
from intellect.protocol.swarm import Swarm, SwarmConfig, SwarmJoinError, setup_swarm
from intellect.protocol.swarm.addr_book import AddrBook

logger = logging.getLogger(__name__)

FILE_NAME = "known_peers.json"


def join(config: SwarmConfig, identity: Identity, run_id: str, coordinator_key: bytes, state_dir: Path) -> Swarm:
    """setup_swarm through the bootstrap peers; if none answers, once more through the known peers too."""
    saved = AddrBook()
    saved.load(state_dir / FILE_NAME)
    try:
        swarm = setup_swarm(config, identity, run_id, coordinator_key)
    except SwarmJoinError as e:
        fallback = saved.multiaddrs()
        if not fallback:
            raise
        logger.warning("no bootstrap peer answered; joining through %d peers known from earlier sessions",
                       len(fallback))
        try:
            swarm = setup_swarm(config.model_copy(update={"bootstrap": [*config.bootstrap, *fallback]}),
                                identity, run_id, coordinator_key)
        except SwarmJoinError as again:
            raise SwarmJoinError(f"{e} The {len(fallback)} peers known from earlier sessions "
                                 f"({state_dir / FILE_NAME}) did not answer either.") from again
    for peer, addrs in saved.known().items():
        swarm.remember_addrs(peer, addrs)
    return swarm


def save(swarm: Swarm, state_dir: Path) -> None:
    if swarm.addr_book.known():
        swarm.addr_book.save(state_dir / FILE_NAME)

