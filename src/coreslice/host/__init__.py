"""Discovery: read the running host (or a captured copy of its files) into plain records.

Nothing here writes anything.  Every reader takes a ``root`` directory so that tests can point it
at a captured tree of a real machine.
"""
