"""The ``spiliformer`` command: LightningCLI (fit / validate / test / predict) plus ``analyze``."""

from collections.abc import Sequence

from spikecore.train import console_main, run_cli

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
    (or ``analyze``'s results): what tests and notebooks use."""
    return run_cli(SpiLiFormerClassifier, args, COMMANDS)


def main() -> None:
    """The ``spiliformer`` console script (``spiliformer fit --config configs/demo.yaml``, ``analyze``)."""
    console_main(SpiLiFormerClassifier, COMMANDS)


if __name__ == "__main__":
    main()
