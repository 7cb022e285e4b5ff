"""The swapping host's NBD face: the nbdkit plugin, its settings, `netswap serve`,
and `netswap attach` / `detach` (nbd-client, mkswap, swapon)."""
