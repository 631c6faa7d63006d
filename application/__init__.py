"""Use cases: chat and text completion over the domain ports."""
