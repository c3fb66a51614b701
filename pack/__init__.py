"""packtrain's offline stage: read corpora, template, tokenize, mask labels, bin-pack, write shards."""

__version__ = "0.1.0"
