"""What one engine step costs: the ``StepCostModel`` interface, the roofline, and one instance's
steady-state capacity from either."""
