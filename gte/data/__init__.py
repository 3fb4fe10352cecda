"""Data: WebDataset shards (design.md format) and everything around them.

- ``shards``: the loader (``make_loader``), exact over ranks × DataLoader workers, bad samples skipped and bounded;
- ``plan``: who reads what (split plans, training quotas); ``tario``: tar reading, counts, specs;
  ``transforms``: decode + train/eval geometry (boxes too);
- ``convert``: ``gte data shard`` converters (ImageFolder, Waterbirds, VOC); ``fewshot``: ``gte data fewshot``;
  ``info``: ``gte data info``; ``bench``: ``gte data bench``; ``cli``: the ``gte data`` commands;
- ``demo``: the synthetic demo task; ``testing``: small fixtures (JPEG shards, corruption, truncation).
"""
