"""alps-ds with other libraries: HF Trainer, TRL trainers, and how hooked models save and load.

``from alps_ds.integrations import AlpsSFTTrainer`` (or ``AlpsTrainer``, ``AlpsDPOTrainer``) is the one
import a Trainer/TRL script needs; see docs/hf-trl.md. Names load on first use, so importing this
package pulls in neither transformers nor TRL.
"""

from alps_ds.lazy import lazy_attribute

_LAZY = {
    "AlpsTrainerMixin": "alps_ds.integrations.hf",
    "AlpsTrainer": "alps_ds.integrations.hf",
    "AlpsSFTTrainer": "alps_ds.integrations.trl",
    "AlpsDPOTrainer": "alps_ds.integrations.trl",
    "FrozenRowsReference": "alps_ds.integrations.trl",
    "base_weights": "alps_ds.integrations.reference",
    "raw_state_dict": "alps_ds.integrations.state_dict",
    "merge_state_dict": "alps_ds.integrations.state_dict",
}


def __getattr__(name: str):
    return lazy_attribute(__name__, _LAZY, globals(), name)


__all__ = sorted(_LAZY)
