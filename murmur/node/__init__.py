"""murmur.node."""
