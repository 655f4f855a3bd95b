"""Hugging Face causal LMs as the trainer, the bot and the benchmarks all get them.

Shared by ``trainer/`` and ``bot/`` so that neither reaches into the other's package:

- :mod:`models.hub`: where a model named by a hub id comes from (the hub or the local cache),
  and whether ``MODEL_PATH`` names a model at all;
- :mod:`models.loading`: loading any causal LM for serving or evaluation, with the CPU
  conversions applied once (:mod:`~models.quantize` int8, :mod:`~models.onednn` packed
  projections, both over :mod:`~models.streamed`; :mod:`~models.allocator` returns the memory
  a conversion frees);
- :mod:`models.scratch_tokenizer`: a byte-level BPE trained from text, for the ``tiny-scratch``
  profile, the tests and the benchmarks;
- :mod:`models.errors`: the one-line error an operator reads instead of a traceback.
"""
