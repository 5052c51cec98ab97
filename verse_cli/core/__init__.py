"""Shared core used by every stage: errors, io, geometry, labels and centroids."""
