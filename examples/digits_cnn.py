"""A small CNN on scikit-learn's bundled 8x8 digits, cut into two levels (a DiPaCo grid: features x heads).

Train it with:

    fedmoe demo --spec examples.digits_cnn:spec --grid 2x2
"""

from torch import nn

from fedmoe import Spec
from fedmoe.models.digits import client_data, eval_data


def features() -> nn.Module:
    """64 pixels -> 16 x 4 x 4 feature maps -> 256 features (inputs arrive flat,
    as `fedmoe predict` sends them).
    """
    return nn.Sequential(
        nn.Unflatten(1, (1, 8, 8)), nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten()
    )


def head() -> nn.Module:
    return nn.Sequential(nn.Linear(256, 64), nn.ReLU(), nn.Linear(64, 10))


spec = Spec(name="digits-cnn", levels=[features, head], data=client_data, eval_data=eval_data)
