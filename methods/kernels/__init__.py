"""Attention kernels shared by methods: linear attention and its feature maps."""
