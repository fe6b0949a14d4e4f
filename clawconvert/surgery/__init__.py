"""Checkpoint surgery: tower extraction, LoRA merge, LLaVA assembly."""
