"""Numbers every participant must agree on, each defined once: the shape of a TOPLOC proof and the size
limit of a submission. Changing one is a protocol change: nodes and coordinator change together.

What this module does not know: anything else (it imports nothing).
"""

# TOPLOC (byte-compatible with toploc 0.1.6; docs/spec.md A.1): a proof commits to the TOPK largest
# |values| of a chunk of TOPLOC_CHUNK_SIZE decode positions' hidden states.
TOPLOC_CHUNK_SIZE = 32  # decode rows per proof (toploc's decode_batching_size)
TOPLOC_TOPK = 128  # values per proof

# The largest signed submission (envelope, header and rollout parquet together), and so the largest
# envelope and rollout file anything accepts.
MAX_SUBMISSION_BYTES = 64 * 2**20
