"""alps-ds: ALPS head-sparse fine-tuning for DeepSpeed and Megatron."""

__version__ = "0.1.0"

from alps_ds.arch import AttentionSpec, ModelFingerprint  # noqa: E402
from alps_ds.errors import AlpsError  # noqa: E402
from alps_ds.lazy import lazy_attribute  # noqa: E402
from alps_ds.selection import HeadSelection, Provenance  # noqa: E402

# The engine hook and adapters import torch; load them on first use so `alps-ds --help` stays fast.
_LAZY = {
    "apply": "alps_ds.sparse",
    "merge": "alps_ds.sparse",
    "reparametrize": "alps_ds.sparse",
    "trainable_report": "alps_ds.sparse",
    "HeadRowsLinear": "alps_ds.sparse",
    "HookReport": "alps_ds.hooked",
    "TrainableReport": "alps_ds.sparse",
    "save_adapter": "alps_ds.adapter",
    "load_adapter": "alps_ds.adapter",
    "merge_adapter_into_checkpoint": "alps_ds.adapter",
    "to_peft_lora": "alps_ds.peft_lora",
    "base_weights": "alps_ds.integrations.reference",
}


def __getattr__(name: str):
    return lazy_attribute(__name__, _LAZY, globals(), name)


__all__ = [
    "AlpsError",
    "AttentionSpec",
    "HeadRowsLinear",
    "HeadSelection",
    "HookReport",
    "ModelFingerprint",
    "Provenance",
    "TrainableReport",
    "__version__",
    "apply",
    "base_weights",
    "load_adapter",
    "merge",
    "merge_adapter_into_checkpoint",
    "reparametrize",
    "save_adapter",
    "to_peft_lora",
    "trainable_report",
]
