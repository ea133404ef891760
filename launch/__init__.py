"""Entry points and the code that wires model, parallel layers and data together."""
