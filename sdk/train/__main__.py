"""`python -m hanlin.train --config C.yaml [--resume auto]`: the worker every process of a
training job runs (torchrun, the deepspeed launcher, srun). `hanlin train` starts it."""

from __future__ import annotations

import argparse
import os
import sys

from hanlin.backends.base import HanlinError


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m hanlin.train")
    ap.add_argument("--config", required=True)
    ap.add_argument("--resume", default="never", help="never | auto (newest good checkpoint) | a checkpoint folder")
    ap.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # the deepspeed launcher's
    args = ap.parse_args(argv)
    if args.local_rank is not None:
        os.environ.setdefault("LOCAL_RANK", str(args.local_rank))
    from hanlin.train.config import TrainConfig
    from hanlin.train.trainer import run

    try:
        cfg = TrainConfig.from_yaml(args.config)
        run(cfg, resume=args.resume)
    except HanlinError as e:
        print(f"hanlin train: {e}", file=sys.stderr, flush=True)
        return 2
    finally:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
