"""``pdserve plan``: screen instance types, check fleets in the simulator, search for the cheapest
one meeting the SLOs, and report it."""
