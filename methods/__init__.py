"""quantreg's built-in quantization methods, one module per family.

Importable as ``quantreg.methods``. Nothing here is imported by ``import quantreg``: the
registry imports a module the first time one of its methods is looked up. These modules use
only quantreg's public API, exactly as a third-party plugin does.
"""
