"""Loaded by ``model.generate(custom_generate=<repo dir>, trust_remote_code=True)``."""
