"""The pdserve inference engine: model, paged KV cache, scheduler, sampler."""
