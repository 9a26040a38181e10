"""Stage 'bench': see yt8m_qrnn.bench."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "src"))
from yt8m_qrnn.bench import bench  # noqa: E402
from yt8m_qrnn.cli import run_stage  # noqa: E402

run_stage(bench)
