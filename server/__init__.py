"""netswap's server side: the page-store server, its backends, the nbdkit plugin."""
