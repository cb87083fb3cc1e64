"""Request handling: sampling parameters, the model runner, the LLM API."""
