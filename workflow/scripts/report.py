"""Stage 'report': see yt8m_qrnn.stages.report."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "src"))
from yt8m_qrnn import stages  # noqa: E402
from yt8m_qrnn.cli import run_stage  # noqa: E402

run_stage(stages.report)
