"""The cluster tier: a Redis-protocol cluster (Redis Cluster, Valkey) as the agent's
page store, in place of netswap's own stores (`serve --cluster redis://...`).
`layout` says where pages live (sans-IO), `client` is the agent's client for it."""
