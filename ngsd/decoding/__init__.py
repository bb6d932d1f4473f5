"""The guarded decoding loop, the base/expert forward pairs, and the Hugging Face `generate` integration."""
