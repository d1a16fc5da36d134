"""Helpers without polytask dependencies: atomic files, terminal tables."""
