"""Clients of outside services, each through its official SDK: mail (SendGrid, file,
console) and LLMs (OpenAI, Anthropic). Provider failures are mapped to the platform's
errors here (``TransientError`` leaves retry, ``PermanentError`` leaves dead-letter)."""
