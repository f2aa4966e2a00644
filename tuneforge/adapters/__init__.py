"""Parameter-efficient adapters (LoRA, DoRA, rsLoRA) on top of PEFT, as plain functions."""

from tuneforge.adapters.lora import (
    apply_lora,
    is_peft_model,
    list_adapters,
    load_adapter,
    merge_to_folder,
    save_adapter,
    set_adapter,
)
# Trainable-state save/load is one pair of functions for LoRA and full fine-tuning alike (checkpoints).
from tuneforge.train.checkpoint import load_trainable_state_dict, trainable_state_dict

__all__ = [
    "apply_lora", "is_peft_model", "list_adapters", "load_adapter", "load_trainable_state_dict",
    "merge_to_folder", "save_adapter", "set_adapter", "trainable_state_dict",
]
