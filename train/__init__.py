"""packtrain's trainer: stream packed shards into Hugging Face causal LMs with varlen attention."""
