"""Labs, run from the development machine: `lab vm` (a real kernel in QEMU swaps
through netswap) and `lab up` / `load` / `down` (the compose topology as local
processes with a verified workload)."""
