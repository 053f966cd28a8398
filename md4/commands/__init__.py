"""The commands that read or write a model, one module per family; md4/main.py parses the flags,
resolves the config and the model directory, and calls them with plain values."""
