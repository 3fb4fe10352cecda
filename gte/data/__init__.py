"""Data: WebDataset shards (design.md format) and everything around them.

- ``spec``: shard specs → URLs;
- ``tar``: the WebDataset key rule, ranged sample reading, header walks (``ReadProblem`` instead of exceptions);
- ``index``: sample counts from tar headers (cached; a spec resolved once into a ``ShardSet``), the ``shards.json``
  side index, ``classes.json``;
- ``plan``: who reads what (split plans, training quotas);
- ``loader``: ``make_loader`` / ``LoaderConfig``, exact over ranks × DataLoader workers; ``stream``: what one (rank,
  worker) slot reads; ``guard``: bad samples skipped, counted and bounded;
- ``images``: the decompression-bomb limit and 8-bit RGB conversion; ``transforms``: decode + train/eval geometry
  (boxes too), sample metadata checks;
- ``writers``: shards from datasets (``core``, ``imagefolder``, ``waterbirds``, ``voc``) and few-shot subsets
  (``fewshot``);
- ``synthetic``: the demo's synthetic task; ``info``: shard summaries; ``bench``: loader throughput.
"""
