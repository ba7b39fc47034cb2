"""The control-path benchmark: runctl and Freak side by side.

Modules here use only the standard library, except ``program`` (pydantic plus the tool
under test): the Freak side runs them from Freak's own venv.
"""
