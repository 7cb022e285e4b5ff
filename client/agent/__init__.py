"""The per-host agent: swap slots -> replicated pages on remote page stores.

Runs inside nbdkit (`backend=remote`) on the swapping host: `machine/` decides
everything about replicas (a sans-IO state machine and its resync and rebuild);
`remote` is the nbdkit-thread side (reserve copies, payloads, read-your-writes),
`direct` a lone request from its own thread, `core`, `startup`, `routes` and
`driver` the event loop that carries the machine's decisions out, `stores` and
`batches` one per store, `payload` and `fills` what a page becomes on the wire,
`seal` and `keys` its encryption and the keyring, `policy` the batching rules,
`reserve` the preallocated swap-out buffers, `stats` what its ops endpoint serves.
"""
