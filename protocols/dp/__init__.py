"""Differential privacy in the ring: clipping and noise mechanisms, and the session wrapper that
applies them to any aggregator (accounting lives in the application)."""
