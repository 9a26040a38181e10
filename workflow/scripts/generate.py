"""Stage 'generate': the embedded dataset in the YouTube-8M format (declared in yt8m_qrnn.pipeline.dag)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "src"))
from yt8m_qrnn.pipeline.cli import run_stage  # noqa: E402

run_stage("generate")
