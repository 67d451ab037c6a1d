"""Cluster operations: Ray Job submission, local clusters, authentication. Imports base modules only."""
