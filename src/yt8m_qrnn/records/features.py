"""The YouTube-8M feature layout, declared once: sizes, classes, id keys and the uint8 quantization.

Stored frames are uint8 q, read as q * SCALE + BIAS: the starter code's Dequantize(max=2, min=-2),
scale (max - min) / 255, bias (max - min) / 512 + min.
"""
from __future__ import annotations

import numpy as np

RGB_DIM, AUDIO_DIM = 1024, 128
FEATURE_DIM = RGB_DIM + AUDIO_DIM
NUM_CLASSES = {2: 3862, 1: 4716}  # by dataset version: 2 is YouTube-8M 2018, 1 is 2017
ID_KEYS = {2: "id", 1: "video_id"}
LEVELS = ("video", "frame")

SCALE = 4.0 / 255.0
BIAS = 4.0 / 512.0 - 2.0


def dequantize(q: np.ndarray) -> np.ndarray:
    return q.astype(np.float32) * np.float32(SCALE) + np.float32(BIAS)


def quantize(values: np.ndarray) -> np.ndarray:
    """The uint8 q whose dequantized value is nearest to each of `values` (clipped to 0..255)."""
    return np.clip(np.rint((values - BIAS) / SCALE), 0, 255).astype(np.uint8)
