"""Tiny random models and exported bundles shared by the tests."""
