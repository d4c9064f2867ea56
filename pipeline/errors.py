"""Errors a user fixes by changing a setting, shared by every stage without importing what raises them."""


class ClusterError(RuntimeError):
    """The Ray cluster or storage cannot run this configuration; the message says what to change."""
