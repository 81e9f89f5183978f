"""The ``tdformer`` command: LightningCLI (fit / validate / test / predict) plus ``analyze``."""

from collections.abc import Sequence

from spikecore.train import console_main, run_cli

from .analysis import analyze
from .module import TDFormerClassifier

COMMANDS = {
    "analyze": (
        analyze,
        "Measure TDFormer's mechanisms on a checkpoint: MI between successive steps, gradient norm per "
        "step and firing rates, with and without feedback. Writes analysis.json and PNG plots.",
    )
}


def run(args: Sequence[str] | None = None):
    """Run a command (``["fit", "--config", ...]``; None: ``sys.argv``) and return the LightningCLI object
    (or ``analyze``'s results): what tests and notebooks use."""
    return run_cli(TDFormerClassifier, args, COMMANDS)


def main() -> None:
    """The ``tdformer`` console script (``tdformer fit --config configs/demo.yaml``, ``tdformer analyze``)."""
    console_main(TDFormerClassifier, COMMANDS)


if __name__ == "__main__":
    main()
