"""LinVideo (arXiv 2510.08318): selective transfer of softmax to linear attention, trained with ADM.

``attention`` holds the per-layer state (scores r, feature maps) and the ``linvideo`` method;
``losses`` the objectives, one function per equation. See ``reference/linvideo.md`` for sources.
"""
