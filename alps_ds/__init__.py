"""alps-ds: ALPS head-sparse fine-tuning for DeepSpeed and Megatron."""

__version__ = "0.1.0"

from alps_ds.arch import AttentionSpec, ModelFingerprint  # noqa: E402
from alps_ds.errors import AlpsError  # noqa: E402
from alps_ds.selection import HeadSelection, Provenance  # noqa: E402

__all__ = ["AlpsError", "AttentionSpec", "HeadSelection", "ModelFingerprint", "Provenance", "__version__"]
