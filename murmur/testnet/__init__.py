"""murmur.testnet."""
