"""Parsing of Kubernetes-style quantities and unit helpers.

Role: turn "24Gi", "512Mi", "1.5G", 8e9 into bytes, and Mbit/s into bytes/s. Pure; imports
nothing from the project and must not import torch, kopf or a Kubernetes client.
"""

from __future__ import annotations

import re

_BINARY = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50}
_DECIMAL = {"k": 10**3, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "P": 10**15}
_QUANTITY = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?)\s*([A-Za-z]*)\s*$")


def parse_bytes(value: int | float | str) -> int:
    """Parse a byte quantity: a number, or a Kubernetes quantity such as ``24Gi`` or ``8G``."""
    if isinstance(value, bool):
        raise ValueError(f"expected a byte quantity, got {value!r}")
    if isinstance(value, int | float):
        if value < 0:
            raise ValueError(f"byte quantity must be >= 0, got {value}")
        return int(value)
    match = _QUANTITY.match(value)
    if not match:
        raise ValueError(f"cannot read {value!r} as bytes; write e.g. 24Gi, 512Mi or 8000000000")
    number, suffix = float(match.group(1)), match.group(2)
    if suffix in ("", "B"):
        scale = 1
    elif suffix in _BINARY:
        scale = _BINARY[suffix]
    elif suffix in _DECIMAL:
        scale = _DECIMAL[suffix]
    else:
        raise ValueError(f"unknown unit {suffix!r} in {value!r}; use Ki, Mi, Gi, Ti or k, M, G, T")
    return int(number * scale)


def mbps_to_bytes_per_second(mbps: float) -> float:
    """Megabits per second (10^6 bit/s, as network links are sold) to bytes per second."""
    return mbps * 1e6 / 8.0
