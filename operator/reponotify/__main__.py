"""``python -m reponotify`` is the ``reponotify`` command."""
from reponotify.cli import main

main(prog_name='reponotify')
