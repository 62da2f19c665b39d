"""DeepSpeed entry point: ``deepspeed launch/train.py --deepspeed_config ds_configs/zero2.json [--recipe NAME]
[--set key=value ...] [--run-dir DIR] [--resume auto|PATH|none]``. With no data arguments it runs the demo."""

import sys

from gpd_ds.train_cli import main

if __name__ == "__main__":
    sys.exit(main())
