"""Specs a user would write: each file is a whole problem for fedmoe, named as `examples.<file>:spec`."""
