"""Kubernetes resource quantities and unit helpers.

Role: read quantities exactly as the API server does (``resource.ParseQuantity``: "24Gi",
"512Mi", "1.5G", "8e9", "500m"), and turn them into bytes; Mbit/s into bytes/s. Used by the
cluster loader, the operator's node inventory and the API models' validation. Pure; imports
nothing from the project and must not import torch, kopf or a Kubernetes client (the
client's ``parse_quantity`` would pull the whole client into the planner).
"""

from __future__ import annotations

import math
import re
from decimal import Decimal, localcontext

#: A Kubernetes quantity (the API server's pattern for int-or-string resource quantities).
QUANTITY = r"^\+?([0-9]+(\.[0-9]*)?|\.[0-9]+)([KMGTPE]i|[numkMGTPE]|[eE][-+]?[0-9]+)?$"
MAX_BYTES = 2**63 - 1
_BINARY_SUFFIX = {"Ki": 10, "Mi": 20, "Gi": 30, "Ti": 40, "Pi": 50, "Ei": 60}
_DECIMAL_SUFFIX = {"n": -9, "u": -6, "m": -3, "": 0, "k": 3, "M": 6, "G": 9, "T": 12, "P": 15,
                   "E": 18}
_QUANTITY_PARTS = re.compile(r"\+?(?P<num>[0-9]+(\.[0-9]*)?|\.[0-9]+)(?P<suffix>.*)")


def quantity_value(text: str) -> Decimal | None:
    """The value of a Kubernetes quantity string in base units (None: not a quantity), as
    ``resource.ParseQuantity`` reads it (exponents beyond an int32 are no quantity)."""
    if re.fullmatch(QUANTITY, text) is None:
        return None
    parts = _QUANTITY_PARTS.fullmatch(text)
    assert parts is not None
    number, suffix = Decimal(parts["num"]), parts["suffix"]
    with localcontext() as ctx:
        ctx.prec = 200
        if suffix in _BINARY_SUFFIX:
            return number * Decimal(2 ** _BINARY_SUFFIX[suffix])
        if suffix in _DECIMAL_SUFFIX:
            return number.scaleb(_DECIMAL_SUFFIX[suffix])
        exponent = int(suffix[1:])
        if not -(2**31) <= exponent < 2**31:
            return None
        if number == 0:
            return Decimal(0)
        # far beyond any bound either way: do not build a number with a billion digits
        exponent = max(min(exponent, 100 - number.adjusted()), -100 - number.adjusted())
        return number.scaleb(exponent)


def parse_bytes(value: int | float | str) -> int:
    """Bytes in a number, or in a Kubernetes quantity such as ``24Gi``, ``8G`` or ``8e9``
    (rounded up, as Kubernetes rounds a byte quantity); a clear error otherwise."""
    if isinstance(value, bool):
        raise ValueError(f"expected a byte quantity, got {value!r}")
    if isinstance(value, int | float):
        if not value >= 0 or math.isinf(value):
            raise ValueError(f"byte quantity must be a finite number >= 0, got {value}")
        return int(value)
    exact = quantity_value(value.strip())
    if exact is None:
        raise ValueError(
            f"cannot read {value!r} as bytes; write a Kubernetes quantity such as 24Gi, 512Mi, "
            "8G or 8000000000"
        )
    if exact > MAX_BYTES:
        raise ValueError(f"{value!r} is more than {MAX_BYTES} bytes (an int64, as in Kubernetes)")
    return int(exact.to_integral_value(rounding="ROUND_CEILING"))


def mbps_to_bytes_per_second(mbps: float) -> float:
    """Megabits per second (10^6 bit/s, as network links are sold) to bytes per second."""
    return mbps * 1e6 / 8.0
