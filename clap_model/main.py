"""clap-train: train CLAP on audiodata shards, on a CPU, one GPU, or many through torchrun.

The arguments are parsed before torch loads (clap_model.trainer holds the run), so `--help` and
mistakes answer at once.
"""
from __future__ import annotations

import sys
from pathlib import Path

from clap_model import files
from clap_model.cli_common import Stop, load_modules, run_command
from clap_model.config import UsageError, error_line
from clap_model.inputs import check_named
from clap_model.params import train_parser

PROG = "clap-train"


def main(argv: list[str] | None = None) -> int:
    stop = Stop()
    run = None

    def body(stop: Stop) -> int:
        nonlocal run
        args = train_parser().parse_args(argv)
        for name in ("batch_size", "epochs", "workers", "log_every", "save_frequency", "val_frequency"):
            if getattr(args, name) < (0 if name == "workers" else 1):
                print(f"{PROG}: error: --{name.replace('_', '-')} must be positive", file=sys.stderr)
                return 2
        try:  # said before torch loads
            files.check_out(Path(args.out), args.resume)
            resumed = str(Path(args.out) / "latest.pt") if args.resume == "latest" else args.resume
            check_named(args.model, args.train_data, (args.val_data, args.zeroshot_data), (resumed, args.pretrained))
        except (UsageError, OSError) as exc:
            print(f"{PROG}: error: {error_line(exc)}", file=sys.stderr)
            return 2
        load_modules(stop, "clap_model.trainer")
        from clap_model import distributed
        from clap_model.trainer import Run

        info = None
        try:
            info = distributed.init(args.device)
            run = Run(args, info, stop)
            if args.resume:
                run.resume()
            run.fit()
        except (UsageError, OSError) as exc:
            print(f"{PROG}: error: {error_line(exc)}", file=sys.stderr)
            return 2
        finally:
            if info is not None:
                distributed.shutdown(info)
        return 0

    return run_command(PROG, body, stop, lambda: run.interrupted_line() if run is not None else "nothing saved")


if __name__ == "__main__":
    sys.exit(main())
