"""The adapter registry (versions, lineage, aliases) and the register stage with its promotion gate."""
