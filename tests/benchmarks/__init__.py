"""Tests for the benchmark baselines."""
