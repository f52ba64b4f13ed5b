"""Short experiments that choose a design by measurement (not part of any training command)."""
