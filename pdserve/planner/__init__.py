"""Capacity and cost planning: hardware and model catalogues, cost model, simulator, optimizer."""
