"""The agent's replica logic as one sans-IO state machine (machine.py), its data
(slots.py, table.py), its durable record (record.py), and its long tasks as
generators over it (resync.py, rebuild.py) that a driver -- the agent's loop or
the simulator -- runs step by step (steps.py)."""
