"""The model on one engine: tokens in, tokens out.

    generator.py   Generator: prefill + decode over the KV cache, one sequence
    batching.py    BatchDecoder: continuous batching, chunked prefill
    speculative.py Speculator: a batch of one drafts k tokens with the bundle's draft graph,
                   the target verifies them in one pass (greedy-exact, rejection sampling)
    spec_control.py  KController: each round's k from measured per-k costs (pure arithmetic)
    prefix_cache.py  PrefixCache: KV of prompt prefixes reused by later prompts (LRU, bytes)
    stream.py      Chunk, Completion, GenerationStats, StopMatcher: what a generation yields
    sampling.py    greedy / temperature / top-k / top-p, seeded
    tokenizer.py   tokenizer.json + chat template, without transformers
    probe.py       the bundle's quality and latency probe (build time and on the device)

May import: engines, bundle, errors. No threads, no queues, no network: serving/ owns those.
"""
