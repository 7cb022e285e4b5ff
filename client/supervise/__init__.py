"""The supervisor: one small process per attached device that outlives nbdkit.

Stdlib only, and only relative imports inside this package: attach starts it
as `python3 -S` with this folder's parent on sys.path (attach.supervisor_argv),
so that it pins at most 16 MiB locked. `supervisor` watches and restarts,
`child` starts nbdkit detached, `handshake` and `netlink` hand the kernel a
socket, `protect` and `knobs` are what it asks of the kernel, `logs` keeps its
log writes (and nbdkit's) off the takeover's path.
"""
