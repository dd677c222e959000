"""The package's version, in a leaf module: files record it, modules import it from here
(not from the package's ``__init__``, which would make every such module depend on the
package's top and close an import cycle through it)."""

__version__ = "0.1.0"
