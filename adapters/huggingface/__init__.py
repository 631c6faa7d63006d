"""HuggingFace transformers/torch adapters: model loading and the generator."""
