"""Settings of the peer-to-peer plane, one pydantic model shared by the node and the coordinator.

What this module does not know: how a backend runs the swarm or how the values are collected (TOML,
environment, CLI flags); the app's settings tree embeds `SwarmConfig` and validates it once.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

Multiaddr = Annotated[str, Field(min_length=1, max_length=256, pattern=r"^/")]


class SwarmConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    backend: Literal["hivemind", "libp2p"] = Field(
        "hivemind", description="Peer-to-peer stack: hivemind (its bundled Go daemon) or libp2p (py-libp2p, pure "
                                "Python). Every peer of a run uses the coordinator's.")
    host: str = Field("0.0.0.0", description="IP address to listen on ('0.0.0.0' = all interfaces).")
    port: int = Field(0, ge=0, le=65535,
                      description="TCP port to listen on; 0 picks a free one. Fix it to forward it in a router.")
    bootstrap: list[Multiaddr] = Field(
        default_factory=list, max_length=64,
        description="Multiaddrs (/ip4/../tcp/../p2p/..) of peers to join through; empty starts a new swarm.")
    client_mode: bool = Field(False, description="Only dial out: download, never serve or store DHT records. "
                                                 "Use this behind a NAT you cannot open.")
    startup_timeout_s: float = Field(30.0, gt=0, le=600,
                                     description="How long the libp2p daemon may take to start.")
    join_timeout_s: float = Field(60.0, gt=0, le=3600,
                                  description="Give up joining when no bootstrap peer answered within this.")
    use_relay: bool = Field(True, description="Allow connections through libp2p circuit relays.")
    use_auto_relay: bool = Field(False, description="Look for a relay to be reachable from behind a NAT.")
    announce_addrs: list[Multiaddr] = Field(default_factory=list, max_length=16,
                                            description="Public multiaddrs to announce (port forwarding).")
    max_upload_mbit: float | None = Field(None, gt=0, le=1e6,
                                          description="Upload cap for serving shards, Mbit/s; None = unlimited.")
    cache_steps: int = Field(3, ge=1, le=1000, description="Policy steps kept in the shard cache.")
    max_cache_bytes: int = Field(50 * 2**30, ge=1, description="Disk cap for the shard cache, bytes.")
    record_ttl_s: float = Field(300.0, ge=5, le=86400,
                                description="Lifetime of our DHT records; they are refreshed at a third of it.")
    max_record_ttl_s: float = Field(3600.0, ge=60, le=86400,
                                    description="Refuse to store DHT records that expire later than this from now "
                                                "(a vandal's record cannot outlive it). At least record_ttl_s.")

    @field_validator("host")
    @classmethod
    def _host_is_ip(cls, value: str) -> str:
        import ipaddress

        try:
            ipaddress.ip_address(value)
        except ValueError:
            raise ValueError(f"host must be an IP address, got {value!r}") from None
        return value

    @model_validator(mode="after")
    def _ttl_within_cap(self) -> SwarmConfig:
        if self.record_ttl_s > self.max_record_ttl_s:
            raise ValueError(f"record_ttl_s ({self.record_ttl_s:.0f} s) exceeds max_record_ttl_s "
                             f"({self.max_record_ttl_s:.0f} s): peers would refuse our records")
        return self

    @property
    def upload_bytes_per_s(self) -> float | None:
        return None if self.max_upload_mbit is None else self.max_upload_mbit * 1e6 / 8
