"""murmur.learning.aggregators."""
