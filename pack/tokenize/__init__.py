"""Everything that turns text into token ids: choosing and loading a tokenizer and its
fingerprint (:mod:`.choose`, :mod:`.loading`), template segments to ids and label masks
(:mod:`.segments`), the thread that feeds the Rust tokenizer (:mod:`.encode_thread`), the reuse of
fixed template text's ids (:mod:`.head_tokens`, :mod:`.fixed_pieces`) and the faster allocator
pack-build re-executes itself on (:mod:`.allocator`)."""
