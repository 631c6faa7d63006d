"""A local ``custom_generate`` repo: diverse (group) beam search, which transformers 5 moved to the Hub."""
