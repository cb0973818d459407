"""Models: loading (bundled, folder, hub; quantized), target modules, the memory plan."""
