"""Aggregation methods: one small file each, registered by name (see base.py)."""

from fedsim.methods.base import Method, available_methods, get_method, make_method, register_method

__all__ = ["Method", "available_methods", "get_method", "make_method", "register_method"]
