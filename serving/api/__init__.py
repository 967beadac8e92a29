"""HTTP routers that are not OpenAI inference: the adapter registry and its auth."""
