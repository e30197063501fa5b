"""Parameter, MAC and latency measurement."""

from .counting import LayerRow, count_macs, count_params, layer_table, mac_counter
from .latency import measure_latency

__all__ = ["LayerRow", "count_macs", "count_params", "layer_table", "mac_counter", "measure_latency"]
