"""The mathematics of DKM in plain torch: no nn.Module and no transformers, importable on its own.

attention.py  squared distances, the attention softmax, nearest-centroid assignment
buckets.py    the distinct 16-bit values of a weight (eDKM's uniquification)
dkm.py        the DKM loop as memory-lean autograd functions (chunked and uniquified); the choice of path
fused.py      the DKM loop as fused kernels, torch.library ops (dkm_fused.cpp on CPU, fused_triton.py on CUDA)
fused_triton.py / triton_kernels.py  the Triton launches and kernels (CUDA; CPU tensors under TRITON_INTERPRET=1)
kmeans.py     k-means++ and Lloyd initialisation of the centroids
packing.py    b-bit index packing
native.py     the native CPU kernels of palettized inference (lut_kernels.c/.cpp as torch operators; optional)
extension.py  building native code with torch.utils.cpp_extension; the warning when a fallback is taken
linear.py     a linear map by a frozen weight decoded on demand, decoded again in backward (adapters on packed weights)
"""
