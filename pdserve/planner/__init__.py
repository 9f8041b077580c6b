"""Capacity and cost planning, one subpackage per part (docs/planner.md):

    catalogue/  hardware and model catalogues (data/ holds the shipped JSON)
    cost/       what one engine step costs: the interface, the roofline, steady-state capacity
    sim/        the discrete-event simulator of prefill/decode pools
    plan/       ``pdserve plan``: screening, fleet checks, the cheapest-fleet search, the report
    calibrate/  ``pdserve plan calibrate``: this machine's measured step costs
    validate/   ``pdserve plan validate``: the simulator against measured load runs
    online.py   pool sizes for the load a running router sees

Traffic (workloads, records, statistics) comes from ``pdserve/traffic/`` and machine probes from
``pdserve/machine.py``; nothing here imports the benchmarks (the ``bench`` package).
"""
