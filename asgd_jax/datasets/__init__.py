"""TFDS dataset builders shipped with asgd_jax (real data that works offline).

Custom ``tfds`` builders must live in a package module to register; importing this package
registers them with tensorflow-datasets under their snake-case names (``sklearn_digits``).
"""

from asgd_jax.datasets.digits import SklearnDigits

__all__ = ["SklearnDigits"]
