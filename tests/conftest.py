"""Shared pytest configuration for the penwatch suite."""
