"""murmur.learning.trainers."""
