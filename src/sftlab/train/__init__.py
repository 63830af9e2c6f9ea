"""The training loop (loop.py) and its parts.

`sftlab.train(cfg)` is the README's Python API, but once any `sftlab.train.*` module is imported Python binds the
name `sftlab.train` to this package, so the package itself is callable: it runs loop.train.
"""
import sys
import types


class _CallablePackage(types.ModuleType):
    def __call__(self, *args, **kwargs):
        from .loop import train

        return train(*args, **kwargs)


sys.modules[__name__].__class__ = _CallablePackage
