"""What any netswap process serves for operators: /metrics, /api/stats, the dashboard.

The store and the swapping host's agent both use it, so it sits in the store's
layer and imports nothing from the host side: the typed snapshot, its
Prometheus exposition, the recorders the swap path writes, and the host's
memory pressure and swap counters.
"""
