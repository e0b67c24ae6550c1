"""Drivers of the round engine on other frameworks: `fedmoe.strategies.flower` runs it over Flower."""
