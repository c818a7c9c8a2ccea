"""Analytic FLOP count of AST training (used by the step and grid benchmarks)."""

from __future__ import annotations


def ast_forward_flops(num_frames: int, hidden: int = 768, layers: int = 12, intermediate: int = 3072,
                      mel_bins: int = 128, patch: int = 16, stride: int = 10, num_labels: int = 10) -> float:
    """Multiply-adds x 2 of one AST forward pass on one clip (matmuls only; norms/softmax are negligible)."""
    f = (mel_bins - patch) // stride + 1
    t = (num_frames - patch) // stride + 1
    n = f * t + 2  # patches + [CLS] + [DIST]
    patch_embed = 2 * f * t * patch * patch * hidden
    per_layer = 2 * n * (4 * hidden * hidden + 2 * hidden * intermediate) + 2 * 2 * n * n * hidden
    head = 2 * hidden * num_labels
    return patch_embed + layers * per_layer + head


def ast_train_flops(num_frames: int, **kw) -> float:
    """Forward + backward (backward ~ 2x forward) for one clip."""
    return 3 * ast_forward_flops(num_frames, **kw)


# Dense peak TFLOP/s per card, from the vendors' data sheets (no sparsity): (fp32, fp16/bf16 tensor cores).
PEAK_TFLOPS = {
    "Tesla T4": (8.1, 65.0),
    "NVIDIA A100-SXM4-40GB": (19.5, 312.0),
    "NVIDIA A100-SXM4-80GB": (19.5, 312.0),
    "NVIDIA L4": (30.3, 121.0),
    "NVIDIA H100 80GB HBM3": (67.0, 989.0),
    "NVIDIA H200": (67.0, 989.0),
}
