"""Writers of design.md shards: ``core`` (items, shard plans and names, the atomic tar writer, ``write_split``),
``imagefolder``, ``waterbirds`` and ``voc`` (``gte data shard …`` converters), ``fewshot`` (``gte data fewshot``).

Shards in the HF ``timm/imagenet-1k-wds`` layout need no conversion: the loader reads them as they are (``gte data
info`` summarises them).
"""
