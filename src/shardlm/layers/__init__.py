"""Pure math of a Llama layer: norms, rotary embeddings, activations, linears."""
