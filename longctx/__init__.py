"""longctx: long-context document analysis with a Llama-4-Scout-style MoE."""
