"""sharedecode: beam search, sampling and shared-prompt batches on a paged KV cache."""
