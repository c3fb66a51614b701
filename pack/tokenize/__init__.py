"""Everything that turns text into token ids: loading a tokenizer and its fingerprint
(:mod:`.loading`), the thread that feeds the Rust tokenizer (:mod:`.encode_thread`), the reuse of
fixed template text's ids (:mod:`.head_tokens`, :mod:`.fixed_pieces`) and the faster allocator
pack-build re-executes itself on (:mod:`.allocator`)."""
