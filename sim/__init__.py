"""Many-device simulation and evaluation on real data."""
