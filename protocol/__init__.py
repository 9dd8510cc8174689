"""What every participant of an intellect-node run agrees on: keys, signed envelopes, message
schemas, shard manifests, TOPLOC proofs, rollout records, tasks and the swarm interface.

Pure protocol: this package imports neither `intellect.node` nor `intellect.coordinator`, and no
GPU-only library."""
