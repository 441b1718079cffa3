"""Fidelity of a method's videos to the dense videos made from the same noise: PSNR and SSIM (torchmetrics).

Computed on the decoded uint8 frames kept by every run (before mp4 encoding, so codec noise does not
hide attention error). PSNR is that of the whole video's MSE (dB; infinite for identical videos), not
the mean of per-frame PSNR; SSIM is the mean of per-frame SSIM (Gaussian window 11, sigma 1.5). Both
are then averaged over videos.
"""

from __future__ import annotations

import torch


def compare_clips(candidate: torch.Tensor, reference: torch.Tensor) -> dict[str, float]:
    """PSNR (dB, whole clip) and SSIM (0-1, mean over frames) of uint8 clips ``(F, H, W, 3)`` of one shape."""
    from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

    if candidate.shape != reference.shape:
        raise ValueError(f"clips differ in shape: {tuple(candidate.shape)} vs {tuple(reference.shape)}")
    a, b = (clip.permute(0, 3, 1, 2).to(torch.float64) for clip in (candidate, reference))  # (F, 3, H, W)
    psnr = peak_signal_noise_ratio(a, b, data_range=255.0)
    ssim = structural_similarity_index_measure(a, b, data_range=255.0, reduction="elementwise_mean")
    return {"psnr_db": float(psnr), "ssim": float(ssim)}
