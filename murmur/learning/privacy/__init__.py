"""murmur.learning.privacy."""
