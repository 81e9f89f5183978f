"""The ``tdformer`` command: LightningCLI (fit / validate / test / predict) plus ``analyze``."""

from collections.abc import Sequence

from spikecore.train import console_main, run_cli

from .analysis import add_arguments, analyze
from .module import TDFormerClassifier

COMMANDS = {
    "analyze": (
        analyze,
        "Measure TDFormer's mechanisms on a checkpoint, with and without feedback: the T x T mutual "
        "information across steps (Fig. 1), gradients along time (end-to-end per step and Theorem 4.3's "
        "dH(t2)/dH(t1)), the PM's surrogate gradients with and without its clamp (Fig. 3) and firing "
        "rates. Writes analysis.json and PNG plots.",
        add_arguments,
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
