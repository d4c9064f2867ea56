"""Errors a user fixes by changing a setting, shared by every stage without importing what raises them."""


class ClusterError(RuntimeError):
    """The Ray cluster or storage cannot run this configuration; the message says what to change."""


class NotRetriedError(ValueError):
    """A training worker failed in a way a retry from the last checkpoint meets again (the same
    weights, data and settings give the same NaN loss); the message says what to change."""


class SearchFailedError(RuntimeError):
    """Every trial of a search failed; the message gives their causes (settings that diverge,
    workers that could not start), each what the user changes."""
