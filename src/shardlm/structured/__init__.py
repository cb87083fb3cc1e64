"""Structured outputs: a request's output constrained to a JSON schema, a regex, a list of
choices or an EBNF grammar, with xgrammar (the optional extra ``shardlm[structured]``).

params      StructuredOutputs, the spec (checked without xgrammar)
compiler    GrammarCache: parse at add_request, compile in a thread pool, cache per spec
state       GrammarState: one sequence's matcher, fed each token it generates
masks       apply_grammar_masks: the sampler's call, bitmasks applied on the device
tokenizer_info  the vocabulary as xgrammar needs it (model vocab size, special tokens)

Importing this package does not import xgrammar; the first grammar does.
"""

from shardlm.structured.params import StructuredOutputs

__all__ = ["StructuredOutputs"]
