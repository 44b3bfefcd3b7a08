"""``python -m flashback_agents.cli``: the same as the ``flashback-agents`` command."""

from . import main

main()
