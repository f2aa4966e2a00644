"""Parameter-efficient adapters (LoRA, DoRA, rsLoRA) on top of PEFT, as plain functions."""

from tuneforge.adapters.lora import (
    apply_lora,
    is_peft_model,
    list_adapters,
    load_adapter,
    load_trainable_state_dict,
    merge_to_folder,
    save_adapter,
    set_adapter,
    trainable_state_dict,
)

__all__ = [
    "apply_lora", "is_peft_model", "list_adapters", "load_adapter", "load_trainable_state_dict",
    "merge_to_folder", "save_adapter", "set_adapter", "trainable_state_dict",
]
