"""The ``spiliformer`` command: LightningCLI (fit / validate / test / predict), ``analyze`` and ``convert``.

``spiliformer convert --from authors CKPT.pth OUT.ckpt [--config YAML]`` turns a checkpoint of the authors'
released code into one the other commands accept (:mod:`spiliformer.convert`); it does not have the
``--config / --ckpt_path`` shape of spikecore's extra commands, so it is dispatched here, before
LightningCLI sees the arguments.
"""

import sys
from collections.abc import Sequence

from spikecore.train import console_main, run_cli, user_errors_exit

from .analysis import add_arguments, analyze
from .module import SpiLiFormerClassifier

COMMANDS = {
    "analyze": (
        analyze,
        "Measure where attention goes on a checkpoint: per layer, the share of attention mass on "
        "foreground vs background tokens, attention entropy and firing rates, for SpiLiFormer and the "
        "same weights with lateral inhibition off. Writes analysis.json and PNG plots.",
        add_arguments,
    )
}


def run(args: Sequence[str] | None = None):
    """Run a command (``["fit", "--config", ...]``; None: ``sys.argv``) and return the LightningCLI object
    (or ``analyze``'s results, or ``convert``'s summary): what tests and notebooks use."""
    argv = list(sys.argv[1:] if args is None else args)
    if argv and argv[0] == "convert":
        from .convert import convert_command

        return convert_command(argv[1:])
    return run_cli(SpiLiFormerClassifier, args, COMMANDS)


def main() -> None:
    """The ``spiliformer`` console script (``spiliformer fit --config configs/demo.yaml``, ``analyze``,
    ``convert``); errors a user causes are one line and exit status 2."""
    if sys.argv[1:2] == ["convert"]:
        with user_errors_exit():
            run()
        return
    console_main(SpiLiFormerClassifier, COMMANDS)


if __name__ == "__main__":
    main()
