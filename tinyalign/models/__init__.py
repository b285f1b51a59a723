"""Model modules, one file per concern: vision towers, connectors, the Llama-family decoder,
and the TinyAlign vision-language model that composes them."""
