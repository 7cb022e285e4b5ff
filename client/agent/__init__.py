"""The per-host agent: swap slots -> replicated pages on remote page stores.

Runs inside nbdkit (`backend=remote`) on the swapping host: `device` is the
nbdkit-thread side (reserve copies, read-your-writes), `core` the event loop
(routing, replication, repair), `links` one per store (health, batches),
`placement` the slab table, `policy` the batching rules, `reserve` the
preallocated swap-out buffers, `stats` what its ops endpoint serves.
"""
