"""Custom operators. ``selective_scan`` is the SelectiveScan op (see ``contract``)."""

from .selective_scan import (
    SCAN_OP,
    selective_scan,
    selective_scan_backward,
    selective_scan_chunked,
    selective_scan_ref,
)

__all__ = [
    "SCAN_OP",
    "selective_scan",
    "selective_scan_backward",
    "selective_scan_chunked",
    "selective_scan_ref",
]
