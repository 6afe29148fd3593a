"""Toy tasks: prompt generators with verifiable rewards."""
