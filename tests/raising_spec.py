"""The tabular example with a data loader that raises in any process where FEDMOE_TEST_NO_DATA is set:
tests give that variable to the coordinator's process only, to show that it never loads training data."""

import os
from dataclasses import replace

from examples.tabular import spec as tabular

NO_DATA = "FEDMOE_TEST_NO_DATA"


def client_data(partition: int, partitions: int):
    """The tabular example's client data, unless this process must not load any."""
    if os.environ.get(NO_DATA):
        raise RuntimeError(f"training data loaded in a process that must not load it ({NO_DATA} is set)")
    return tabular.data(partition, partitions)


spec = replace(tabular, name="tabular-on-clients-only", data=client_data)
