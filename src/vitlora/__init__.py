"""vitlora: fine-tune Hugging Face vision transformers with LoRA."""

__version__ = "0.1.0"
