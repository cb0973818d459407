"""LoRA Studio: LoRA and QLoRA fine-tuning in the browser and from the command line."""

__version__ = "0.1.0"
