"""Checkpoint surgery: LoRA merging (:mod:`.lora`, :mod:`.merge`) and LLaVA assembly (:mod:`.llava`)."""
