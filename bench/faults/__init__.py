"""The fault campaign (``make faults``): kill, stop and cut the services under load, compare every
greedy output with a fault-free run, and write docs/reliability.md. See scripts/make_faults.py."""
