"""reponotify: Quay-style repository notifications for any container registry."""

__version__ = '0.1.0'
