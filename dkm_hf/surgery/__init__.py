"""Model surgery: selecting the modules to cluster and converting them between dense, DKM and palettized forms.

select.py   which modules a DKMConfig clusters; which share a weight
convert.py  the module swaps (dense -> DKM -> palettized -> dense), the one place module types change
model.py    the model-level operations users call: prepare, palettize, dequantize, palettized_view
importance.py  importance-weighted k-means and DKM loop: gradient_importance, init_centroids, set_importance
gptq.py     error-compensated snapping onto the centroids before training: gptq_snap
allocation.py  a bit width per weight within the size of one width for all: allocate_bits
"""

from .allocation import allocate_bits
from .gptq import gptq_snap
from .importance import gradient_importance, init_centroids, set_importance
from .model import get_dkm_config, palettize, palettized_view, record_of, set_inference_mode

__all__ = [
    "allocate_bits",
    "get_dkm_config",
    "gptq_snap",
    "gradient_importance",
    "init_centroids",
    "palettize",
    "palettized_view",
    "record_of",
    "set_importance",
    "set_inference_mode",
]
