"""Loader benchmark: decode + augment img/s per DataLoader worker vs one training process.

Same as `gte data bench`:  python benchmarks/loader.py [--workers 1,2] [--images 384] [--decoder pil,torchvision]
[--model bcos_resnet18] [--json FILE]
"""

import sys

from gte.cli import main

if __name__ == "__main__":
    sys.argv = ["gte", "data", "bench", *sys.argv[1:]]
    main()
