"""Mixture of Contexts: layout -> routing -> Selection -> attention backend.

Read in this order: layout.py (chunks), routing.py (the rules), selection.py (sparsity as data),
attention.py (the entry point and the float32 reference), then flex.py and the Triton kernels.
"""

from .attention import ATTENTION_RANGE, BACKENDS, ROUTING_RANGE, attend, dense_attention, dense_is_faster, moc_attention, reference_attention, resolve_backend
from .layout import TokenLayout
from .routing import MoCConfig, chunk_descriptors, expected_density, forced_links, route
from .selection import RoutingStats, Selection

__all__ = ["ATTENTION_RANGE", "ROUTING_RANGE", "BACKENDS", "attend", "dense_attention", "dense_is_faster", "MoCConfig", "RoutingStats", "Selection", "TokenLayout", "chunk_descriptors",
           "expected_density", "forced_links", "moc_attention", "reference_attention",
           "resolve_backend", "route"]
