"""Registers joblib's "shoal" backend in every Python process of the joblib
suite run (see joblib_suite_plugin.py): the suite's scripts and nested calls
name ``backend="shoal"`` without importing ``shoal.joblib``."""

import importlib.abc
import importlib.util
import sys


class _ThenShoal(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name != "joblib":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec("joblib")
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def exec_then_register(module):
            exec_module(module)
            import shoal.joblib  # noqa: F401 - registers backend="shoal"

        spec.loader.exec_module = exec_then_register
        return spec


sys.meta_path.insert(0, _ThenShoal())
