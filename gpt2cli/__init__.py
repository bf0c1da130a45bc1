"""gpt2: prepare data for, train, evaluate, sample from and compare GPT-2-family models.

The command line (`gpt2 ...`) is a thin layer over this package; every workflow is also a Python
function. Specs (``gpt2cli.specs``) hold every setting and its default.
"""

__version__ = "0.1.0"
