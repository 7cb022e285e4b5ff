"""netswap's host side: everything that runs on the swapping host.

`nbd/` (the nbdkit plugin, its settings, serve, attach/detach, the supervisor),
`agent/` (slots to replicated pages on remote stores), `device` (the contract
the plugin exports, and the embedded device over the store's backends), `rpc`
(the store clients), `hardening` (mlock, IO_FLUSHER, OOM), and the `netswap`
CLI. Imports go one way: client -> server -> protocol; the labs (netswap.lab)
sit above and reach the CLI through an entry point.
"""
