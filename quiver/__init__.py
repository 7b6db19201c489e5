"""Quiver: many LoRA adapters over one shared base model, behind the OpenAI API."""

__version__ = "0.1.0"
