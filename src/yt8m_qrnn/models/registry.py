"""The model kinds: the input level each needs. The params validator and the builders both read it."""
from __future__ import annotations

# None: either level (the QRNN runs over the frames, or over the video vector as a sequence of one step).
KIND_LEVELS = {"logistic": "video", "moe": "video", "frame_logistic": "frame", "lstm": "frame", "dbof": "frame",
               "qrnn": None}
