"""The discrete-event simulator: a router in front of prefill and decode (or colocated) pools that
run the engine's own scheduler and block manager (docs/simulator.md)."""
