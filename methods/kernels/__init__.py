"""Attention kernels shared by methods: linear attention and its feature maps (``linear_attention``),
block-sparse attention on FlexAttention with its masked dense equivalent (``block_sparse``), and the Triton
kernels (``linear_attention_triton``, ``xattn_scoring_triton``), each entered through a ``torch.library`` custom
op in :data:`OP_NAMESPACE` so that torch.compile treats the launch code as one opaque call."""

OP_NAMESPACE = "attention_bench"
