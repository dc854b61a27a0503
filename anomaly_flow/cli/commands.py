"""Imports every command module so that each registers itself on the ``main`` group."""

# One line per command module, added as commands land.
