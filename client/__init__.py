"""netswap's host side: everything that runs on the swapping host.

`nbd/` (the nbdkit plugin, its settings, serve, attach/detach), `agent/` (slots
to replicated pages on remote stores), `device` (the contract the plugin
exports, and the embedded device over the store's backends), `rpc` (the store
client), `hardening` (mlock, IO_FLUSHER, OOM), the `netswap` CLI, and `lab/`.
Imports go one way: client -> server -> protocol.
"""
