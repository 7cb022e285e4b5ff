"""netswap's store side: the page-store server, its backends, and the ops endpoint.

Runs on each store machine (`netswap store`). `ops/` is what any netswap
process serves to operators, the agent on the swapping host included. This
package imports only `netswap.protocol`.
"""
