"""Clients of outside services, each through its official SDK: mail (SendGrid, file,
console), LLMs (OpenAI, Anthropic), embedders (OpenAI, local sentence-transformers) and
vector stores (Qdrant). Provider failures are mapped to the platform's errors here
(``TransientError`` leaves retry, ``PermanentError`` leaves dead-letter)."""
