"""The evaluate stage: base, new adapter and champion scored on the same rows (Ray Data actors)."""
