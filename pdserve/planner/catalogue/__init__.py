"""Hardware and model catalogues: the shipped JSON (``planner/data/``), with a user file merged
over it by name."""
