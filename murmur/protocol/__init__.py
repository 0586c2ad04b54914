"""Networking half of murmur: identity, transport, wire format, discovery.

This package must not import torch (nor anything under murmur.learning).
"""
