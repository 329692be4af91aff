"""Simulated fleet devices for scripts/fleet_sim.py and the rollout tests."""
