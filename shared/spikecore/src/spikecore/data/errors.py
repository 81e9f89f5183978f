"""The one error a data module raises when its files are not where it expects them."""

from ..errors import UserError


class DatasetNotFoundError(UserError, FileNotFoundError):
    """A dataset's files are missing or not laid out as expected; the message names the layout."""


def missing_dataset_message(
    name: str, root: str, layout: str, problem: str = "", downloadable: bool = True
) -> str:
    """One message for every data module: what is missing, the expected layout, and how to fetch it."""
    detail = f" ({problem})" if problem else ""
    fetch = (
        "Put the files there, or set `download: true` (data.init_args.download in a LightningCLI config) "
        "to fetch them."
        if downloadable
        else "Put the files there; this dataset cannot be downloaded automatically."
    )
    return f"{name} not found under root={root!r}{detail}.\nExpected layout:\n{layout}\n{fetch}"
