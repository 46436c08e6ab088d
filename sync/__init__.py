"""Sync: the only path by which anything leaves a device (sealed, DP deltas; signed releases)."""
