"""Data: WebDataset shard reading and the synthetic demo task."""
