"""convlens — explain CNN image classifiers: where they look, what each layer sees, what people call it."""

__version__ = "0.1.0"
