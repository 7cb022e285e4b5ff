"""netswap's client side: the store RPC client, the per-host agent, the CLI."""
