"""Clients of outside services (mail, LLMs, embedders, vector stores), behind small protocols."""
