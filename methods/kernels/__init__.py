"""Attention kernels shared by methods: linear attention and its feature maps (``linear_attention``),
block-sparse attention on FlexAttention with its masked dense equivalent (``block_sparse``)."""
