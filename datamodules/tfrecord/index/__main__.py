"""``python -m datamodules.tfrecord.index SHARD [SHARD ...]``: write the index files of existing shards.

A package's ``__main__`` so that running it does not re-execute a module ``datamodules.tfrecord`` has
already imported (which makes runpy warn).
"""

import sys

from . import main

sys.exit(main())
