"""Post-training k-means palettization: the no-training baseline of the accuracy suite.

Every weight that dkm_hf would cluster gets a per-tensor k-means (scikit-learn, on the histogram of its distinct
float16 values weighted by their counts, so outliers are seen) and is snapped to its nearest centroid. The centroids
are written into the model's DKM modules, so the result goes through the same palettize / save_pretrained /
from_pretrained path as a DKM-trained model.
"""

from __future__ import annotations

import numpy as np
import torch
from sklearn.cluster import KMeans

import dkm_hf


def kmeans_1d(weight: torch.Tensor, k: int, seed: int = 0) -> torch.Tensor:
    """k centroids of the values of `weight` (k-means++ then Lloyd, weighted by value counts) -> (k,) float32."""
    values, counts = np.unique(weight.detach().to(torch.float16).float().numpy().ravel(), return_counts=True)
    if values.size <= k:
        return torch.from_numpy(np.resize(values, k).astype(np.float32))
    km = KMeans(n_clusters=k, n_init=3, random_state=seed).fit(values[:, None], sample_weight=counts)
    return torch.from_numpy(km.cluster_centers_[:, 0].astype(np.float32))


@torch.no_grad()
def palettize_post_training(model: torch.nn.Module) -> torch.nn.Module:
    """Set the centroids of every (per-tensor, cluster_dim 1, unscaled) DKM module by post-training k-means."""
    for name, module in dkm_hf.dkm_modules(model):
        layout = module.layout
        if layout.cluster_dim != 1 or layout.groups != 1 or layout.per_channel_scale:
            raise ValueError(f"{name}: the post-training baseline handles per-tensor cluster_dim 1 LUTs only")
        module.centroids.copy_(kmeans_1d(module.weight, layout.n_clusters).view(1, -1, 1))
        module.dkm_ready = True
    return model
